"""``magnet train DATASET ...``: one recipe per shipped bundle."""

from __future__ import annotations

import sys

RECIPES = {"mnist": "training.build_mnist", "cifar10": "training.build_cifar10",
           "cifar10-guided": "training.build_guided", "pool": "training.build_pool",
           "folder": "training.build_folder", "domain": "training.build_domain"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in RECIPES:
        print(f"usage: magnet train {{{','.join(RECIPES)}}} [--help]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(RECIPES[argv[0]]).main(argv[1:])

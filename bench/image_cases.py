"""Image decoding cases of docs/security.md: sizes claimed in the header, 16-bit grey, a drawing in the
alpha channel alone, EXIF orientation; time and outcome per case.

    python -m bench.image_cases                          # the current decoder
    git show REV:service/codecs.py > /tmp/old.py && python -m bench.image_cases --codecs /tmp/old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import numpy as np
from PIL import Image

from service.defense.bundle import InputSpec
from tests.service.test_images import b64, png_claiming


def load(path: str | None):
    if path is None:
        import service.codecs as codecs
        return codecs
    spec = importlib.util.spec_from_file_location("codecs_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["codecs_under_test"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", help="a service/codecs.py to test instead of the installed one")
    codecs = load(p.parse_args(argv).codecs)
    spec = InputSpec(shape=(1, 28, 28))
    levels = (np.arange(784).reshape(28, 28) * 83).astype("<u2")
    ink = np.zeros((28, 28), np.uint8)
    ink[5:23, 12:16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = [
        ("header claims 12000x12000", png_claiming(12000, 12000), None),
        ("header claims 30000x30000", png_claiming(30000, 30000), None),
        ("16-bit grey, 784 levels", b64(Image.frombytes("I;16", (28, 28), levels.tobytes())),
         lambda x: f"{len(np.unique(x))} distinct levels"),
        ("digit drawn in alpha only (72 ink pixels)",
         b64(Image.merge("LA", [Image.new("L", (28, 28), 0), Image.fromarray(ink)])),
         lambda x: f"{int((x > 0.5).sum())} ink pixels"),
        ("EXIF orientation 6", b64(Image.fromarray(ink), "PNG", exif=exif.tobytes()),
         lambda x: "rotated" if np.allclose(x[0], np.rot90(ink, -1) / 255) else "not rotated"),
    ]
    print("case | seconds | outcome")
    for name, blob, check in cases:
        started = time.perf_counter()
        try:
            x = codecs.decode_image(blob, 0, spec)
            outcome = check(x) if check else "decoded"
        except Exception as e:  # noqa: BLE001 - the point is to show what escapes
            outcome = f"{type(e).__name__}: {str(e)[:70]}"
        print(f"{name} | {time.perf_counter() - started:.3f} | {outcome}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

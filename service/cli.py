"""``magnet``: ``serve`` runs the gateway; ``pack`` makes a self-contained copy of a bundle; ``migrate``
rewrites a bundle's manifest in the current format; ``train`` rebuilds a shipped bundle or builds one from a
user's image folder and classifier (``train folder``) and ``evaluate`` attacks
one (both need the 'train' extra, evaluate also 'eval')."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from service.access import ConfigError
from service.defense.bundle import BundleError
from service.settings import Settings

# CLI flag -> settings field; every flag also has an environment twin MAGNET_<FIELD>.
SERVE_FLAGS = {
    "--bundle": ("bundle", str, "bundle directory to serve (default: the shipped MNIST bundle)"),
    "--upstream": ("upstream", str, "base URL of an OIP v2 model server; absent: embedded classifier"),
    "--upstream-model": ("upstream_model", str, "model name on the upstream (default: the bundle's name)"),
    "--upstream-protocol": ("upstream_protocol", str, "v2 (Triton, KServe, MLServer), tfserving or v1 (KServe v1: "
                                                      "TF Serving's REST predict API)"),
    "--host": ("host", str, "interface to listen on (default 127.0.0.1)"),
    "--port": ("port", int, "port to listen on (default 8000)"),
    "--operator-port": ("operator_port", int, "port of /metrics (default 8002; equal to --port: one port)"),
    "--device": ("device", str, "auto, cpu or cuda: where onnxruntime runs"),
    "--workers": ("workers", int, "gateway processes (default: one per core embedded, one per two cores in front of a model "
                               "server; at most 8)"),
    "--mode": ("mode", str, "enforce (default) or shadow: score and count everything, reject nothing"),
    "--log-level": ("log_level", str, "debug, info, warning or error"),
}


def serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="magnet serve", description="Run the MagNet gateway. Every flag "
                                "also reads from MAGNET_<NAME> in the environment; flags win.")
    for flag, (dest, kind, help_text) in SERVE_FLAGS.items():
        p.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    p.add_argument("--explain", action="store_true", default=None,
                   help="add detector scores to results (helps attackers: not for production)")
    kserve = p.add_argument_group("as a KServe transformer", "the arguments KServe's controller appends to a "
                                  "custom transformer container (deploy/kserve)")
    kserve.add_argument("--model_name", dest="kserve_model", help="the InferenceService's name: the model "
                        "served on the v2 front and asked of the predictor")
    kserve.add_argument("--predictor_host", help="host[:port] of the predictor: the upstream (OIP v2)")
    kserve.add_argument("--http_port", type=int, dest="kserve_port", help="port to listen on")
    kserve.add_argument("--predictor_use_ssl", action="store_true", default=None, help="https to the predictor")
    kserve.add_argument("--predictor_protocol", "--protocol", dest="predictor_protocol",
                        help="v2 (the Open Inference Protocol) or v1 (KServe v1, TF Serving's REST predict API), "
                        "over REST; clients then use the gateway's v2 or v1 front")
    args = p.parse_args(argv)
    if args.predictor_protocol not in (None, "v1", "v2"):
        p.error(f"--predictor_protocol {args.predictor_protocol}: the gateway speaks v1 or v2 over REST to the predictor")
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    flags = {dest: flag for flag, (dest, _, _) in SERVE_FLAGS.items() if dest in overrides}
    if "explain" in overrides:
        flags["explain"] = "--explain"
    kserve = kserve_overrides(args, overrides)
    flags.update({field: KSERVE_FLAGS[field] for field in kserve})
    overrides.update(kserve)
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"magnet serve: {settings_errors(e, flags)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from service.workers import default_workers, ort_threads_per_worker

    if not settings.workers:
        settings = settings.model_copy(update={"workers": default_workers(embedded=settings.upstream is None)})
    settings = settings.model_copy(update={"ort_threads": ort_threads_per_worker(settings)})
    if settings.workers > 1:
        return _serve_workers(settings, overrides)

    from service.app import create_app
    from service.workers import serve as serve_app

    try:
        app = create_app(settings)
    except (BundleError, ConfigError) as e:
        print(f"magnet serve: {e}", file=sys.stderr)
        return 2
    serve_app(app, settings)
    return 0


# settings field -> the KServe argument it comes from (kserve_overrides)
KSERVE_FLAGS = {"model_name": "--model_name", "upstream_model": "--model_name", "upstream": "--predictor_host",
                "port": "--http_port", "upstream_protocol": "--predictor_protocol"}


def settings_errors(error: ValidationError, flags: dict[str, str]) -> str:
    """A settings ValidationError in the words of the command line: which flag (``flags``: field -> the flag
    that set it) or else MAGNET_ variable, the value given, and what is allowed (no traceback)."""
    lines = []
    for item in error.errors():
        if not item["loc"]:  # a check across settings: its message names them
            lines.append(item["msg"].removeprefix("Value error, "))
            continue
        field = str(item["loc"][0])
        where = flags.get(field, f"MAGNET_{field.upper()}")
        msg, given = item["msg"].removeprefix("Value error, "), repr(item.get("input"))
        lines.append(f"{where} {msg}" if msg.startswith(given) else f"{where} {given}: {msg}")
    return "; ".join(lines) or str(error)


def kserve_overrides(args: argparse.Namespace, overrides: dict) -> dict:
    """Settings from the arguments KServe gives a transformer; explicit gateway flags win."""
    out: dict = {}
    if args.kserve_model:
        out["model_name"] = args.kserve_model
        if "upstream_model" not in overrides:
            out["upstream_model"] = args.kserve_model
    if args.predictor_host and "upstream" not in overrides:
        scheme = "https" if args.predictor_use_ssl else "http"
        out["upstream"] = f"{scheme}://{args.predictor_host}"
    if args.kserve_port and "port" not in overrides:
        out["port"] = args.kserve_port
    if args.predictor_protocol and "upstream_protocol" not in overrides:
        out["upstream_protocol"] = args.predictor_protocol
    return out


def _serve_workers(settings: Settings, overrides: dict[str, object]) -> int:
    """Check the bundle here (so a bad one fails once, with its message), then start the workers."""
    from service.access import ApiKeys
    from service.defense.bundle import read_manifest, verify_files
    from service.workers import run_workers

    try:
        manifest = read_manifest(settings.bundle)
        verify_files(settings.bundle, manifest)
        ApiKeys.from_settings(settings)
    except (BundleError, ConfigError) as e:
        print(f"magnet serve: {e}", file=sys.stderr)
        return 2
    run_workers(settings, overrides, len(manifest.members))
    return 0


def train(argv: list[str]) -> int:
    try:
        from training.cli import main as train_main
    except ImportError as e:
        print(f"magnet train needs the training extra (pip install -e '.[train]'): {e}", file=sys.stderr)
        return 2
    return train_main(argv)


def evaluate(argv: list[str]) -> int:
    try:
        from training.evaluate.run import main as evaluate_main
    except ImportError as e:
        print(f"magnet evaluate needs the train and eval extras (pip install -e '.[train,eval]'): {e}",
              file=sys.stderr)
        return 2
    return evaluate_main(argv)


def pack(argv: list[str]) -> int:
    from service.defense.bundle import pack as pack_bundle

    p = argparse.ArgumentParser(prog="magnet pack", description="Copy a bundle with every file it uses "
                                "inside it (a classifier shared with other bundles included) and its "
                                "manifest rewritten to those copies: for images, volumes and archives.")
    p.add_argument("--bundle", required=True, help="the bundle to pack (where its shared files are present)")
    p.add_argument("--out", required=True, help="new or empty directory for the self-contained copy")
    args = p.parse_args(argv)
    try:
        out = pack_bundle(args.bundle, args.out)
    except BundleError as e:
        print(f"magnet pack: {e}", file=sys.stderr)
        return 2
    print(f"packed {args.bundle} into {out} ({len(list(out.iterdir()))} files)")
    return 0


def migrate(argv: list[str]) -> int:
    from service.defense.bundle import FORMAT_VERSION, manifest_version, read_manifest, verify_files, write_manifest

    p = argparse.ArgumentParser(prog="magnet migrate", description="Rewrite a bundle's manifest in the current "
                                f"format (version {FORMAT_VERSION}); the gateway reads older ones as they are, "
                                "this makes the file itself current. The model files are not touched.")
    p.add_argument("--bundle", required=True, help="the bundle whose manifest.json to rewrite")
    args = p.parse_args(argv)
    try:
        before = manifest_version(args.bundle)
        manifest = read_manifest(args.bundle)
        verify_files(args.bundle, manifest)
    except BundleError as e:
        print(f"magnet migrate: {e}", file=sys.stderr)
        return 2
    if before == FORMAT_VERSION:
        print(f"{args.bundle}: manifest already at format version {FORMAT_VERSION}")
        return 0
    write_manifest(args.bundle, manifest)
    print(f"{args.bundle}: manifest rewritten from format version {before} to {FORMAT_VERSION}")
    return 0


COMMANDS = {"serve": serve, "train": train, "evaluate": evaluate, "pack": pack, "migrate": migrate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: magnet {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except BundleError as e:  # a bundle that is missing or broken, met by any command: say so, no traceback
        print(f"magnet {argv[0]}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

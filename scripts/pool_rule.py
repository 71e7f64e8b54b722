#!/usr/bin/env python3
"""Apply the pool-rebuild rule (docs/results/pools.md, "Rebuilding the pool on c15") to measured files.

Reads the validation measurements of two pool bundles, member by member, and says whether the rebuilt
pool may replace the shipped one:

- ``--selection``: one or more ``selection.json`` files written by
  ``python -m training.evaluate.selection table --every-member``; each member's row *with the thresholds
  it ships with* (``as_shipped``) is used;
- ``--domain``: one or more JSON files written by ``scripts/domain_attacks.py --every-member --images``
  (uncompressed originals and their JPEG copies).

The rule: (1) every rebuilt member keeps selection-set clean accepted-and-right at least the shipped
pool's lowest member minus ``--clean-margin`` points, and PGD at least ``--pgd-floor``; (2) the mean
selection-set FGSM over members is at least the shipped pool's; (3) the mean over members of (clean
originals accepted and right + FGSM from them defended) beats the shipped pool's by ``--originals-margin``
points. Exit status 0 when every part holds, 1 when one fails, 2 on missing or malformed input.

    python scripts/pool_rule.py --shipped models/cifar10-pool --rebuilt runs/pool15-bundle \\
        --selection docs/results/cifar10-pool15-selection/selection.json \\
        --domain docs/results/cifar10-pool15-selection/domain-attacks.json --out rule.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class RuleInputError(ValueError):
    """A measurement the rule needs is missing or malformed."""


def _norm(bundle: str) -> str:
    return str(Path(bundle)).rstrip("/")


def _members(selection: list[dict], domain: list[dict], bundle: str, fgsm: str, pgd: str) -> list[dict]:
    """Per-member figures in % for one pool bundle, in member order."""
    b = _norm(bundle)
    sel = {}
    for s in selection:
        for r in s.get("as_shipped") or []:
            if _norm(r.get("bundle", "")) == b and r.get("member") is not None:
                sel[int(r["member"])] = r
    if not sel:
        raise RuleInputError(f"no member of {bundle} in the selection files' as_shipped rows "
                             "(run the selection table with --every-member on it)")
    rows = []
    for m in sorted(sel):
        key = f"{b}-m{m}"
        dom = next((d["bundles"][key] for d in domain if key in d.get("bundles", {})), None)
        if dom is None:
            raise RuleInputError(f"no domain-attack rows for {key} (run scripts/domain_attacks.py "
                                 f"--bundle {bundle} --every-member --images ...)")
        try:
            orig = dom["original"]
            row = {"member": m,
                   "clean": 100 * sel[m]["clean_defended"], "fgsm": 100 * sel[m]["fgsm_defended"],
                   "pgd": 100 * sel[m]["pgd_defended"],
                   "orig_clean": 100 * orig["clean"]["accepted_and_right"],
                   "orig_fgsm": 100 * orig[fgsm]["defended"],
                   "orig_pgd": 100 * orig[pgd]["defended"] if pgd in orig else None}
        except KeyError as e:
            raise RuleInputError(f"{key}: missing {e} in the measurements") from None
        if "jpeg" in dom and fgsm in dom["jpeg"]:
            row["jpeg_clean"] = 100 * dom["jpeg"]["clean"]["accepted_and_right"]
            row["jpeg_fgsm"] = 100 * dom["jpeg"][fgsm]["defended"]
        row["orig_sum"] = row["orig_clean"] + row["orig_fgsm"]
        rows.append(row)
    return rows


def _mean(rows: list[dict], k: str) -> float:
    return sum(r[k] for r in rows) / len(rows)


def apply_rule(shipped: list[dict], rebuilt: list[dict], clean_margin: float = 0.5, pgd_floor: float = 98.78,
               originals_margin: float = 2.0) -> dict:
    """The rule's three parts on per-member figures (in %); rounding is left to the report."""
    clean_floor = min(r["clean"] for r in shipped) - clean_margin
    fgsm_floor = _mean(shipped, "fgsm")
    orig_floor = _mean(shipped, "orig_sum") + originals_margin
    low = [r["member"] for r in rebuilt if r["clean"] < clean_floor or r["pgd"] < pgd_floor]
    parts = {
        "1_every_member_clean_and_pgd": {"floor_clean": clean_floor, "floor_pgd": pgd_floor,
                                         "lowest_clean": min(r["clean"] for r in rebuilt),
                                         "lowest_pgd": min(r["pgd"] for r in rebuilt),
                                         "members_below": low, "holds": not low},
        "2_mean_fgsm": {"floor": fgsm_floor, "rebuilt": _mean(rebuilt, "fgsm"),
                        "holds": _mean(rebuilt, "fgsm") >= fgsm_floor},
        "3_mean_originals_clean_plus_fgsm": {"floor": orig_floor, "shipped": _mean(shipped, "orig_sum"),
                                             "rebuilt": _mean(rebuilt, "orig_sum"),
                                             "holds": _mean(rebuilt, "orig_sum") >= orig_floor},
    }
    return {"parts": parts, "replace": all(p["holds"] for p in parts.values())}


def _table(name: str, rows: list[dict]) -> list[str]:
    def f(v):
        return "–" if v is None else f"{v:.2f}"
    out = [f"| {name} member | selection set: clean / FGSM / PGD | originals: clean accepted and right / FGSM / PGD-10 "
           "| their JPEG copies: clean / FGSM |", "| --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['member']} | {f(r['clean'])} / {f(r['fgsm'])} / {f(r['pgd'])} | {f(r['orig_clean'])} / "
                   f"{f(r['orig_fgsm'])} / {f(r.get('orig_pgd'))} | {f(r.get('jpeg_clean'))} / {f(r.get('jpeg_fgsm'))} |")
    out.append(f"| mean | {f(_mean(rows, 'clean'))} / {f(_mean(rows, 'fgsm'))} / {f(_mean(rows, 'pgd'))} | "
               f"{f(_mean(rows, 'orig_clean'))} / {f(_mean(rows, 'orig_fgsm'))} / – | – |")
    return out


def report(result: dict, shipped: list[dict], rebuilt: list[dict]) -> str:
    p = result["parts"]
    one, two, three = p["1_every_member_clean_and_pgd"], p["2_mean_fgsm"], p["3_mean_originals_clean_plus_fgsm"]
    yes = {True: "holds", False: "**fails**"}
    lines = _table("shipped", shipped) + [""] + _table("rebuilt", rebuilt) + [
        "",
        f"1. every rebuilt member clean ≥ {one['floor_clean']:.2f} and PGD ≥ {one['floor_pgd']:.2f}: lowest "
        f"{one['lowest_clean']:.2f} / {one['lowest_pgd']:.2f}; {yes[one['holds']]}"
        + (f" (members {one['members_below']})" if one["members_below"] else ""),
        f"2. mean FGSM ≥ {two['floor']:.2f}: {two['rebuilt']:.2f}; {yes[two['holds']]}",
        f"3. mean (clean originals + FGSM from them) ≥ {three['floor']:.2f} (shipped {three['shipped']:.2f}): "
        f"{three['rebuilt']:.2f}; {yes[three['holds']]}",
        "",
        "Verdict: " + ("the rebuilt pool **replaces** the shipped one." if result["replace"]
                       else "the shipped pool **stays**."),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shipped", required=True, help="the shipped pool bundle, as named in the measurement files")
    p.add_argument("--rebuilt", required=True, help="the rebuilt pool bundle, as named in the measurement files")
    p.add_argument("--selection", type=Path, nargs="+", required=True)
    p.add_argument("--domain", type=Path, nargs="+", required=True)
    p.add_argument("--fgsm", default="fgsm_eps0.025", help="the domain attack row of rule (3)")
    p.add_argument("--pgd", default="pgd10_eps0.025", help="the domain PGD row, reported only")
    p.add_argument("--clean-margin", type=float, default=0.5, help="points below the shipped pool's lowest member")
    p.add_argument("--pgd-floor", type=float, default=98.78, help="%% of the selection set's PGD")
    p.add_argument("--originals-margin", type=float, default=2.0, help="points above the shipped pool's mean")
    p.add_argument("--out", type=Path, help="write the figures and the verdict as JSON")
    a = p.parse_args(argv)
    try:
        selection = [json.loads(f.read_text()) for f in a.selection]
        domain = [json.loads(f.read_text()) for f in a.domain]
        shipped = _members(selection, domain, a.shipped, a.fgsm, a.pgd)
        rebuilt = _members(selection, domain, a.rebuilt, a.fgsm, a.pgd)
    except (OSError, json.JSONDecodeError, RuleInputError) as e:
        print(f"pool_rule: {e}", file=sys.stderr)
        return 2
    result = apply_rule(shipped, rebuilt, a.clean_margin, a.pgd_floor, a.originals_margin)
    print(report(result, shipped, rebuilt), end="")
    if a.out:
        a.out.write_text(json.dumps({"command": " ".join(["python scripts/pool_rule.py", *(argv or sys.argv[1:])]),
                                     "shipped": shipped, "rebuilt": rebuilt, **result}, indent=1) + "\n")
    return 0 if result["replace"] else 1


if __name__ == "__main__":
    sys.exit(main())

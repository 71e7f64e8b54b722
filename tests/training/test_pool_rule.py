"""scripts/pool_rule.py: the pool-rebuild rule applied to measurement files."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "docs" / "results" / "cifar10-pool15-selection" / "shipped"


def _load():
    spec = importlib.util.spec_from_file_location("pool_rule", ROOT / "scripts" / "pool_rule.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rule = _load()


def _as_rebuilt(selection: dict, domain: dict, name: str = "runs/rebuilt") -> tuple[dict, dict]:
    """A copy of the shipped pool's measurements under another bundle name."""
    sel = {"as_shipped": []}
    for r in selection["as_shipped"]:
        sel["as_shipped"].append({**copy.deepcopy(r), "bundle": name})
    dom = {"bundles": {k.replace("models/cifar10-pool", name): copy.deepcopy(v)
                       for k, v in domain["bundles"].items()}}
    return sel, dom


@pytest.fixture
def measured(tmp_path):
    selection = json.loads((SHIPPED / "selection.json").read_text())
    domain = json.loads((SHIPPED / "domain-attacks.json").read_text())
    sel, dom = _as_rebuilt(selection, domain)
    return tmp_path, selection, domain, sel, dom


def _run(tmp_path, selection, domain, sel, dom, *extra):
    files = []
    for i, obj in enumerate([selection, domain, sel, dom]):
        f = tmp_path / f"{i}.json"
        f.write_text(json.dumps(obj))
        files.append(str(f))
    out = tmp_path / "rule.json"
    rc = rule.main(["--shipped", "models/cifar10-pool", "--rebuilt", "runs/rebuilt", "--selection", files[0], files[2],
                    "--domain", files[1], files[3], "--out", str(out), *extra])
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_floors_are_the_documented_ones(measured):
    """The shipped pool's side gives the floors pools.md states: 88.30, 93.02, 174.67."""
    tmp_path, selection, domain, sel, dom = measured
    rc, res = _run(tmp_path, selection, domain, sel, dom)
    p = res["parts"]
    assert round(p["1_every_member_clean_and_pgd"]["floor_clean"], 2) == 88.30
    assert round(p["2_mean_fgsm"]["floor"], 2) == 93.02
    assert round(p["3_mean_originals_clean_plus_fgsm"]["floor"], 2) == 174.67
    assert len(res["rebuilt"]) == len(res["shipped"]) == 8
    # a pool identical to the shipped one passes (1) and (2) but not the 2-point margin of (3)
    assert p["1_every_member_clean_and_pgd"]["holds"] and p["2_mean_fgsm"]["holds"]
    assert not p["3_mean_originals_clean_plus_fgsm"]["holds"]
    assert rc == 1 and res["replace"] is False


def test_better_originals_replace(measured):
    tmp_path, selection, domain, sel, dom = measured
    for v in dom["bundles"].values():
        v["original"]["clean"]["accepted_and_right"] += 0.011
        v["original"]["fgsm_eps0.025"]["defended"] += 0.011
    rc, res = _run(tmp_path, selection, domain, sel, dom)
    assert res["parts"]["3_mean_originals_clean_plus_fgsm"]["holds"]
    assert rc == 0 and res["replace"] is True


@pytest.mark.parametrize("field,delta,part", [("clean_defended", -0.006, "1_every_member_clean_and_pgd"),
                                              ("pgd_defended", -0.011, "1_every_member_clean_and_pgd"),
                                              ("fgsm_defended", -0.001, "2_mean_fgsm")])
def test_one_weak_member_or_lower_fgsm_fails(measured, field, delta, part):
    """One member below the clean floor (88.80 - 0.5) or the PGD floor fails (1); a lower FGSM mean fails (2),
    even with originals far better."""
    tmp_path, selection, domain, sel, dom = measured
    for v in dom["bundles"].values():
        v["original"]["clean"]["accepted_and_right"] += 0.05
    lowest = min(sel["as_shipped"], key=lambda r: r["clean_defended"])
    targets = [lowest] if part.startswith("1") else sel["as_shipped"]
    for r in targets:
        r[field] += delta
    rc, res = _run(tmp_path, selection, domain, sel, dom)
    assert not res["parts"][part]["holds"]
    if part.startswith("1"):
        assert res["parts"][part]["members_below"] == [lowest["member"]]
    assert rc == 1 and not res["replace"]


def test_missing_measurements_are_an_error(measured, capsys):
    tmp_path, selection, domain, sel, dom = measured
    del dom["bundles"]["runs/rebuilt-m3"]
    rc, res = _run(tmp_path, selection, domain, sel, dom)
    assert rc == 2 and res is None
    assert "runs/rebuilt-m3" in capsys.readouterr().err

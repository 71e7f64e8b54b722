"""scripts/rebuild_cifar10_pool.sh: the guards around the pool's rebuild, without training anything.

``MAGNET`` is replaced by a stand-in that records its arguments, so these tests check what the script
decides (resume from the stashed checkpoint, refuse to ship without the rule, refuse members other than
the ones the rule measured), not the training itself."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rebuild_cifar10_pool.sh"
POOL = ROOT / "models" / "cifar10-pool"


def run(stage: str, tmp: Path, **env) -> subprocess.CompletedProcess:
    fake = tmp / "fake-magnet"
    if not fake.exists():
        fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp / 'magnet-calls'}\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    full = {**os.environ, "PY": sys.executable, "MAGNET": str(fake), "LOGS": str(tmp / "logs"),
            "WORK": str(tmp / "work"), "CAND": str(tmp / "cand"), "POOL": str(tmp / "pool"),
            "RESULTS": str(tmp / "results"), "WIP": str(tmp / "wip"), "ORIG": str(tmp / "orig"),
            "SEL": str(tmp / "sel"), **env}
    return subprocess.run(["bash", str(SCRIPT), stage], env=full, capture_output=True, text=True, timeout=120)


def calls(tmp: Path) -> list[str]:
    f = tmp / "magnet-calls"
    return f.read_text().splitlines() if f.exists() else []


def test_unknown_stage_is_refused(tmp_path):
    r = run("everything", tmp_path)
    assert r.returncode == 2 and "unknown stage" in r.stdout
    assert calls(tmp_path) == []


def test_ship_needs_the_rule_and_a_verdict_that_holds(tmp_path):
    r = run("ship", tmp_path)
    assert r.returncode == 2 and "rule stage first" in r.stdout
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "rule.json").write_text(json.dumps({"replace": False}))
    r = run("ship", tmp_path)
    assert r.returncode != 0 and "the shipped pool stays" in r.stdout + r.stderr
    assert calls(tmp_path) == [], "nothing may be built when the rule does not hold"


@pytest.mark.skipif(not (POOL / "manifest.json").exists(), reason="models/cifar10-pool is not shipped here")
def test_verify_accepts_the_same_members_only(tmp_path):
    def bundle(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in POOL.iterdir():
            if f.name.startswith("reformer_") or f.name == "manifest.json":
                shutil.copy(f, d / f.name)
        return d

    cand, pool = bundle("cand"), bundle("pool")
    r = run("verify", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8 members" in r.stdout

    member = pool / "reformer_3.onnx"  # one byte of one member changed
    data = bytearray(member.read_bytes())
    data[-1] ^= 1
    member.write_bytes(bytes(data))
    r = run("verify", tmp_path)
    assert r.returncode != 0 and "reformer_3.onnx differs" in r.stdout + r.stderr
    shutil.copy(cand / "reformer_3.onnx", member)

    manifest = json.loads((pool / "manifest.json").read_text())  # one threshold moved
    manifest["members"][5]["detectors"][0]["threshold"] *= 1.01
    (pool / "manifest.json").write_text(json.dumps(manifest))
    r = run("verify", tmp_path)
    assert r.returncode != 0 and "thresholds differ" in r.stdout + r.stderr


def test_train_restores_the_stashed_checkpoint_and_passes_the_recipe(tmp_path):
    torch = pytest.importorskip("torch")
    (tmp_path / "orig" / "train").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"step": 123, "models": []}, work / "reformer.ckpt")
    (work / "train_logits.npy").write_bytes(b"logits")

    r = run("stash", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stashed step 123" in r.stdout
    assert sorted(p.name for p in (tmp_path / "wip").iterdir()) == ["reformer.ckpt", "train_logits.npy"]

    shutil.rmtree(work)  # the next session's work area is empty
    r = run("train", tmp_path, MINUTES="30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restored the checkpoint" in r.stdout
    assert (work / "train_logits.npy").read_bytes() == b"logits"
    assert torch.load(work / "reformer.ckpt", weights_only=False)["step"] == 123
    (call,) = calls(tmp_path)
    args = call.split()
    assert args[:2] == ["train", "cifar10-guided"]
    assert args[args.index("--work-dir") + 1] == str(work)
    assert args[args.index("--out") + 1] == str(tmp_path / "cand") and "--candidate" in args
    assert args[args.index("--max-minutes") + 1] == "30"
    assert args[args.index("--steps") + 1] == "300" and args[args.index("--members") + 1] == "8"
    assert (tmp_path / "logs" / "rebuild-cifar10-pool-train.log").exists()


def test_train_needs_the_originals(tmp_path):
    r = run("train", tmp_path)
    assert r.returncode == 2 and "no originals" in r.stdout
    assert calls(tmp_path) == []

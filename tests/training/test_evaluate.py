"""Evaluation: the accounting rule on hand-made cases, the attack contract, and a smoke report."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("art")

from training.evaluate import run  # noqa: E402
from training.evaluate.accounting import columns  # noqa: E402
from training.evaluate.attacks import registry  # noqa: E402
from training.from_onnx import torch_twin  # noqa: E402
from tests.conftest import DATA_DIR, ROOT, SHIPPED_MNIST  # noqa: E402


def test_accounting_by_hand():
    y = np.array([0, 1, 2, 3])
    plain = np.array([0, 0, 0, 3])        # right, wrong, wrong, right
    reformed = np.array([0, 1, 0, 0])     # right, right, wrong, wrong
    rejected = np.array([False, False, True, False])
    assert columns(y, plain, reformed, rejected) == {
        "no_defense": 0.5, "detectors_only": 0.75, "reformer_only": 0.5, "full_defense": 0.75}


def test_a_rejected_example_counts_as_defended_whatever_its_label():
    assert columns([1], [0], [0], [True])["full_defense"] == 1.0
    assert columns([1], [0], [0], [False])["full_defense"] == 0.0


def test_accounting_refuses_mismatched_or_empty_input():
    with pytest.raises(ValueError):
        columns([1, 2], [1], [1], [False])
    with pytest.raises(ValueError):
        columns([], [], [], [])


@pytest.fixture(scope="module")
def twin():
    return torch_twin(SHIPPED_MNIST / "classifier.onnx", "mnist", "classifier", (1, 28, 28))


@pytest.mark.parametrize("name, norm, eps", [
    ("fgsm_eps0.01", np.inf, 0.01), ("iterative_linf_eps0.01", np.inf, 0.01), ("iterative_l2_eps1", 2, 1.0),
])
def test_attack_contract(twin, mnist, name, norm, eps):
    x, y = mnist.test.x[:16], mnist.test.y[:16]
    x_adv = registry("mnist")[name](twin, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).reshape(16, -1)
    size = np.abs(d).max(1) if norm == np.inf else np.linalg.norm(d, axis=1)
    assert size.max() <= eps * (1 + 1e-4) and size.max() > eps / 4


def test_deepfool_fools_the_undefended_classifier(twin, mnist):
    import torch

    x, y = mnist.test.x[:16], mnist.test.y[:16]
    x_adv = registry("mnist")["deepfool"](twin, x, y)
    with torch.no_grad():
        assert (twin(torch.from_numpy(x_adv)).argmax(1).numpy() != y).mean() >= 0.9


def test_smoke_evaluation_report(tmp_path, mnist, capsys):
    out = tmp_path / "eval"
    # no --kappas: with --attacks given, only those rows run (no Carlini curve), after the printed plan
    assert run.main(["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--out", str(out),
                     "--attacks", "fgsm_eps0.01", "deepfool", "--n", "24"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("plan (2 jobs;") < printed.index("fgsm_eps0.01: 24 examples in")
    assert "fgsm_eps0.01" in printed and "1 gradients each (exact)" in printed and "carlini" not in printed
    report = json.loads((out / "report.json").read_text())
    assert [r["attack"] for r in report["rows"]] == ["fgsm_eps0.01", "deepfool"]
    assert report["carlini_confidence_curve"] == []
    for row in report["rows"]:
        assert row["examples"] == 24
        for key in ("no_defense", "detectors_only", "reformer_only", "full_defense"):
            assert 0.0 <= row[key] <= 1.0
        # the defense can only add to what the undefended classifier gets right
        assert row["detectors_only"] >= row["no_defense"] and row["full_defense"] >= row["reformer_only"]
    assert report["rows"][1]["no_defense"] <= 0.1  # DeepFool fools the bare classifier
    assert report["clean"]["classifier_test_accuracy"] > 0.99
    md = (out / "report.md").read_text()
    assert "| deepfool | 24 (reduced: 24 examples < 1000) |" in md and "19.1 → 99.4" in md
    assert report["rows"][1]["residual"] is not None and report["rows"][1]["residual"] > 0
    from service.defense.bundle import fingerprint, read_manifest

    assert report["bundle_fingerprint"] == fingerprint(read_manifest(SHIPPED_MNIST))
    assert f"`{report['bundle_fingerprint']}`" in md

    from training.evaluate.summary import summary

    text = summary([out / "report.json"], tmp_path / "docs" / "evaluation.md")
    assert "| deepfool | 24 (reduced) |" in text and "19.1 → 99.4" in text
    assert (tmp_path / "docs" / "evaluation.png").stat().st_size > 1000


def test_cached_adversarial_examples_are_reused_for_the_same_classifier_attack_and_images(tmp_path, mnist, capsys):
    args = ["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--attacks", "fgsm_eps0.01", "--n", "12",
            "--kappas", "--cache", str(tmp_path / "cache")]
    assert run.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert run.main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "fgsm_eps0.01: reusing" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["rows"][0] for d in "ab")
    assert not a["reused_examples"] and b["reused_examples"]
    assert {k: a[k] for k in ("full_defense", "mean_l2", "seconds")} == {k: b[k] for k in ("full_defense", "mean_l2", "seconds")}
    assert run.main([*args[:-5], "--n", "13", "--kappas", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # other images: crafted anew


def test_a_chunked_run_cut_short_picks_up_where_it_stopped(tmp_path, mnist, capsys):
    cache = tmp_path / "cache"
    args = ["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--attacks", "fgsm_eps0.01", "--n", "12",
            "--kappas", "--cache", str(cache)]
    assert run.main([*args, "--cache-chunk", "5", "--out", str(tmp_path / "a")]) == 0
    chunks = sorted(cache.glob("*.npz"), key=lambda f: f.stat().st_mtime_ns)
    assert [len(np.load(f)["x_adv"]) for f in chunks] == [5, 5, 2]  # each chunk kept as soon as it was done
    chunks[1].unlink()  # as if the run had stopped during the second chunk
    capsys.readouterr()
    assert run.main([*args, "--cache-chunk", "5", "--out", str(tmp_path / "plan"), "--plan"]) == 0
    assert "5 examples (+ 7 cached)" in capsys.readouterr().out
    assert run.main([*args, "--cache-chunk", "5", "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("fgsm_eps0.01: reusing") == 2 and chunks[1].exists()
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["rows"][0] for d in "ab")
    assert (a["chunks_reused"], b["chunks_reused"], b["cache_chunk"], b["reused_examples"]) == (0, 2, 5, False)
    assert {k: a[k] for k in ("full_defense", "mean_l2", "no_defense")} == {k: b[k] for k in ("full_defense", "mean_l2", "no_defense")}
    # the same examples as one unchunked run (FGSM treats each image on its own)
    assert run.main([*args, "--out", str(tmp_path / "c")]) == 0
    whole = [f for f in cache.glob("*.npz") if f not in chunks]
    assert len(whole) == 1
    np.testing.assert_allclose(np.load(whole[0])["x_adv"], np.concatenate([np.load(f)["x_adv"] for f in chunks]),
                               atol=1e-6)


def test_shards_craft_disjoint_chunks_without_judging_and_a_plain_run_then_judges_them_all(tmp_path, mnist, capsys):
    cache = tmp_path / "cache"
    args = ["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--attacks", "fgsm_eps0.01", "--n", "12",
            "--kappas", "--cache", str(cache), "--cache-chunk", "4"]
    assert run.main([*args, "--cache-shard", "1/2", "--out", str(tmp_path / "s1")]) == 0
    assert [len(np.load(f)["x_adv"]) for f in cache.glob("*.npz")] == [4]  # chunk 1 of 0, 1, 2
    assert not (tmp_path / "s1" / "report.json").exists()
    assert "4 of 12 examples now in the cache" in capsys.readouterr().out
    assert run.main([*args, "--cache-shard", "0/2", "--out", str(tmp_path / "s0")]) == 0
    assert len(list(cache.glob("*.npz"))) == 3 and "12 of 12 examples" in capsys.readouterr().out
    assert run.main([*args, "--cache-shard", "0/2", "--out", str(tmp_path / "s0")]) == 0  # nothing left to craft
    assert "crafted 0 chunk(s)" in capsys.readouterr().out
    assert run.main([*args, "--out", str(tmp_path / "all")]) == 0
    row = json.loads((tmp_path / "all" / "report.json").read_text())["rows"][0]
    assert (row["chunks_reused"], row["reused_examples"], row["examples"]) == (3, True, 12)
    with pytest.raises(SystemExit):
        run.main([*args, "--cache-shard", "2/2", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit):
        run.main([*args[:-2], "--cache-shard", "0/2", "--out", str(tmp_path / "bad")])


def test_slotted_shards_craft_l0_side_by_side_into_the_same_chunks(tmp_path, mnist, capsys):
    """--cache-slots streams one-example chunks through a batch: the same files as a plain shard would
    write, each with its share of the time, judged by a plain run like any other."""
    cache = tmp_path / "cache"
    args = ["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--attacks", "carlini_l0_fast",
            "--n-carlini", "5", "--kappas", "--cache", str(cache), "--cache-chunk", "1"]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's default
    try:
        assert run.main([*args, "--cache-shard", "0/2", "--cache-slots", "2", "--out", str(tmp_path / "s0")]) == 0
        # the attacks run in full float32 on a GPU: TF32 put 11 of 107 κ = 0 examples on the wrong side
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    printed = capsys.readouterr().out
    assert printed.count("(its share of 2 slots)") == 3 and "3 of 5 examples now in the cache" in printed
    slotted = set(cache.glob("*.npz"))
    for f in slotted:
        kept = np.load(f)
        assert kept["x_adv"].shape == (1, 1, 28, 28) and int(kept["slots"]) == 2 and float(kept["seconds"]) > 0
        assert str(kept["device"]) == "cpu"
    assert run.main([*args, "--cache-shard", "1/2", "--out", str(tmp_path / "s1")]) == 0  # one at a time
    assert len(list(cache.glob("*.npz"))) == 5 and "5 of 5 examples" in capsys.readouterr().out
    assert run.main([*args, "--out", str(tmp_path / "all")]) == 0
    row = json.loads((tmp_path / "all" / "report.json").read_text())["rows"][0]
    assert (row["chunks_reused"], row["reused_examples"], row["examples"]) == (5, True, 5)
    assert row["attack_success"] > 0.5  # the slotted examples are adversarial, not the images returned
    for bad in (["--cache-slots", "2", "--cache-shard", "0/2", "--cache-chunk", "2"],  # chunks of one only
                ["--cache-slots", "2"],  # crafting only, in shards
                ["--cache-slots", "0", "--cache-shard", "0/2"]):
        with pytest.raises(SystemExit):
            run.main([*args, *bad, "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="cannot craft side by side"):
        run.main([*args[:4], "--attacks", "fgsm_eps0.01", *args[6:], "--cache-shard", "0/2", "--cache-slots", "2",
                  "--out", str(tmp_path / "bad")])


def test_plan_lists_what_would_run_with_estimates_and_runs_nothing(tmp_path, mnist, capsys):
    out = tmp_path / "never"
    assert run.main(["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--out", str(out), "--plan",
                     "--attacks", "carlini_l2", "iterative_l2_eps0.5", "--n-carlini", "50", "--kappas", "0", "10",
                     "--carlini-iterations", "100"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    lines = {line.split()[0]: line for line in printed.splitlines()[1:]}
    assert "900 gradients each (at most)" in lines["carlini_l2"] and "50 examples" in lines["carlini_l2"]
    assert "100 gradients each (exact)" in lines["iterative_l2_eps0.5"]
    assert {"carlini_l2_k0", "carlini_l2_k10", "total:"} <= set(lines)


def test_the_carlini_curve_runs_only_when_asked_for_or_with_the_whole_evaluation():
    parse = run.parser().parse_args
    base = ["--bundle", "b", "--data-dir", "d", "--out", "o"]
    assert run.kappas(parse(base)) == [0, 10, 20, 30, 40]
    assert run.kappas(parse([*base, "--attacks", "deepfool"])) == []
    assert run.kappas(parse([*base, "--attacks", "deepfool", "--kappas", "5"])) == [5]
    assert run.kappas(parse([*base, "--kappas"])) == []


def test_an_unknown_attack_is_named_before_anything_runs(tmp_path, mnist):
    with pytest.raises(SystemExit, match="unknown attack.*fgsm_eps0.3; mnist has: fgsm_eps0.005"):
        run.main(["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "x"),
                  "--attacks", "fgsm_eps0.3"])


def test_set_overrides_one_attacks_parameters():
    items = ["carlini_linf.max_iterations=300", "carlini_linf.initial_const=1e-2", "deepfool.overshoot=0.05"]
    assert run._overrides(items, "carlini_linf") == {"max_iterations": 300, "initial_const": 0.01}
    assert run._overrides(items, "deepfool") == {"overshoot": 0.05}
    assert run._overrides(items, "fgsm_eps0.01") == {}
    with pytest.raises(SystemExit):
        run._overrides(["carlini_linf=3"], "carlini_linf")


def test_carlini_l0_row_changes_few_pixels(twin, mnist):
    import torch

    from training.evaluate.attacks import default_names

    names = default_names("mnist")
    assert "carlini_l0" in names and not any(n.endswith(("_art", "_fast")) for n in names)
    assert registry("mnist")["carlini_l0"].params["schedule"] == "carlini"  # the paper's row: Carlini's attack
    x, y = mnist.test.x[:8], mnist.test.y[:8]
    x_adv = registry("mnist")["carlini_l0_fast"](twin, x, y)
    with torch.no_grad():
        fooled = twin(torch.from_numpy(x_adv)).argmax(1).numpy() != y
    assert fooled.mean() >= 0.75
    d = run.distortion(x, x_adv, fooled)
    assert 1 <= d["mean_l0"] <= 40 and d["mean_l0"] == (x_adv != x)[fooled].reshape(fooled.sum(), -1).sum(1).mean()


def test_l0_distortion_counts_pixels_not_channels():
    x = np.zeros((2, 3, 2, 2), np.float32)
    x_adv = x.copy()
    x_adv[0, :, 0, 0] = 0.5  # one pixel, three channels
    x_adv[1, 0, 1, 1] = x_adv[1, 2, 0, 1] = 0.5  # two pixels
    assert run.distortion(x, x_adv, np.array([True, True]))["mean_l0"] == 1.5


def test_own_carlini_rows_report_progress(twin, mnist, capsys):
    from training.evaluate.attacks import Attack

    base = registry("mnist")["carlini_linf"]
    attack = Attack(base.name, base.family, {**base.params, "max_iterations": 20, "initial_const": 1.0,
                                             "batch_size": 2}, base.run)
    calls = []
    attack(twin, mnist.test.x[:4], mnist.test.y[:4], progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (4, 4) and [d for d, _ in calls] == sorted({d for d, _ in calls})
    printer = run.Progress("x", every=1e9)
    printer(1, 4)
    printer(4, 4)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("x: 4/4 images")


def test_rows_below_full_strength_are_marked_reduced():
    from training.evaluate.attacks import Attack, full_strength, reduced, registry

    full = registry("cifar10")
    assert reduced(full["fgsm_eps0.025"], full["fgsm_eps0.025"], 1000) is None
    assert reduced(full["fgsm_eps0.025"], full["fgsm_eps0.025"], 999) == "999 examples < 1000"
    cw = full["carlini_l2"]
    weaker = Attack(cw.name, cw.family, {**cw.params, "binary_search_steps": 3, "max_iterations": 100}, cw.run)
    assert reduced(cw, cw, 200) is None
    assert reduced(weaker, cw, 200) == "max_iterations 100 < 1000; binary_search_steps 3 < 9"
    l0 = full["carlini_l0"]
    assert "max_iterations 10 < 1000" in reduced(Attack(l0.name, l0.family, {**l0.params, "max_iterations": 10}, l0.run), l0, 50)
    # the faster L0 schedule is measured against Carlini's, so its rows say they are reduced
    assert full_strength(full, "carlini_l0_fast") is l0 and full_strength(full, "carlini_l2") is cw
    assert reduced(full["carlini_l0_fast"], l0, 200) == "max_iterations 50 < 1000; geometric schedule, not carlini's"
    assert reduced(l0, full_strength(full, "carlini_l0"), 200) is None


def test_l0_rows_stored_before_carlinis_schedule_read_as_reduced():
    from training.evaluate.report import stored_reduced

    old = {"attack": "carlini_l0", "family": "carlini_l0", "params": {"confidence": 0.0}, "examples": 200}
    assert stored_reduced(old) == "geometric schedule, not carlini's"
    assert stored_reduced({**old, "params": {"schedule": "carlini"}, "reduced": None}) is None
    assert stored_reduced({**old, "reduced": "10 examples < 200"}) == "10 examples < 200"
    assert stored_reduced({"attack": "deepfool", "family": "deepfool", "params": {}, "reduced": None}) is None
    # judged against today's registry from what the row recorded, whatever the run said then
    assert stored_reduced(old, "mnist") == "geometric schedule, not carlini's"
    fast = {**old, "attack": "carlini_l0_fast", "params": {"confidence": 0.0, "max_iterations": 50}, "reduced": None}
    assert stored_reduced(fast, "mnist") == "max_iterations 50 < 1000; geometric schedule, not carlini's"
    linf = {"attack": "carlini_linf", "family": "carlini_linf", "examples": 200, "reduced": None,
            "params": {"confidence": 0.0, "max_iterations": 100, "initial_const": 0.1}}
    assert stored_reduced(linf) is None and stored_reduced(linf, "cifar10") == "max_iterations 100 < 1000"
    full = {**linf, "params": {"confidence": 0.0, "max_iterations": 1000}}
    assert stored_reduced(full, "cifar10") is None
    assert stored_reduced({**full, "examples": 100}, "cifar10") == "100 examples < 200"
    # a user's data set has no registry by name alone: what the run recorded
    assert stored_reduced({**linf, "reduced": "30 examples < 200"}, "folder:bars") == "30 examples < 200"


def test_reports_of_a_bundle_trained_on_attacks_say_so():
    from service.defense import read_manifest
    from tests.conftest import SHIPPED_CIFAR10, SHIPPED_CIFAR10_CLEAN

    assert run.seen_attacks(read_manifest(SHIPPED_CIFAR10))
    assert not run.seen_attacks(read_manifest(SHIPPED_CIFAR10_CLEAN))
    assert not run.seen_attacks(read_manifest(SHIPPED_MNIST))


def test_failure_analysis_splits_the_fooled_examples(mnist):
    from service.defense import Defense
    from training.evaluate.failures import analyse

    defense = Defense(SHIPPED_MNIST, device="cpu")
    x, y = mnist.test.x[:64], mnist.test.y[:64]
    rng = np.random.default_rng(0)
    x_adv = np.clip(x + rng.choice([-0.3, 0.3], size=x.shape), 0, 1).astype(np.float32)  # strong sign noise
    out = analyse(defense, x, y, x_adv)
    assert out["failures"]["n"] + out["stopped"]["n"] == out["fooled"] <= 64
    assert out["stopped"]["n"] > 0 and set(out["stopped"]["median_score_over_threshold"]) == {
        d.name for d in defense.members[0].detectors}
    with pytest.raises(ValueError, match="shapes"):
        analyse(defense, x, y, x_adv[:10])


def test_summary_relinks_report_notes_and_lists_each_paragraph_once(tmp_path):
    from training.evaluate.summary import summary

    docs = tmp_path / "docs"
    reports = []
    for name, note in [("eval-a", "Shared.\n\nSee [the page](../page.md) and [web](https://x.org/y)."),
                       ("eval-b", "Shared.")]:
        (docs / name).mkdir(parents=True)
        report = {"bundle": "models/x", "dataset": "cifar10", "rows": [], "note": note, "clean": {}}
        (docs / name / "report.json").write_text(json.dumps(report))
        reports.append(docs / name / "report.json")
    text = summary(reports, docs / "evaluation.md")
    assert text.count("Shared.") == 1
    assert "[the page](page.md)" in text and "[web](https://x.org/y)" in text


def test_summary_leaves_out_reports_of_earlier_rounds(tmp_path, capsys):
    from training.evaluate.summary import main as summary_main

    source = json.loads((ROOT / "docs" / "results" / "eval-mnist-cw" / "report.json").read_text())
    for name, value in (("eval-x", 0.123), ("eval-x-round1", 0.987), ("eval-x-built", 0.456)):
        report = json.loads(json.dumps(source))
        report["rows"][0]["full_defense"] = value
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    out = tmp_path / "summary.md"
    assert summary_main(["--out", str(out), str(tmp_path / "eval-x-round1" / "report.json"),
                         str(tmp_path / "eval-x" / "report.json"), str(tmp_path / "eval-x-built" / "report.json")]) == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    assert "12.3" in text and "98.7" not in text and "45.6" not in text
    assert "eval-x-round1" in printed and "eval-x-built" in printed


def _report_on(bundle, name, root, value, **fields):
    source = json.loads((ROOT / "docs" / "results" / "eval-mnist-cw" / "report.json").read_text())
    source.pop("bundle_fingerprint", None)
    source.update(bundle=str(bundle), **fields)
    source["rows"][0]["full_defense"] = value
    (root / name).mkdir(parents=True)
    (root / name / "report.json").write_text(json.dumps(source))
    return root / name / "report.json"


def test_summary_marks_reports_of_an_earlier_version_of_their_bundle_stale(toy_bundle, tmp_path, capsys):
    from service.defense.bundle import fingerprint, read_manifest
    from training.evaluate.summary import main as summary_main

    now = fingerprint(read_manifest(toy_bundle))
    fresh = _report_on(toy_bundle, "eval-fresh", tmp_path, 0.111, bundle_fingerprint=now)
    old = _report_on(toy_bundle, "eval-old", tmp_path, 0.222, bundle_fingerprint="f" * 64)
    unknown = _report_on(toy_bundle, "eval-unknown", tmp_path, 0.333)  # no fingerprint, no git revision
    out = tmp_path / "summary.md"
    assert summary_main(["--out", str(out), str(fresh), str(unknown)]) == 0
    assert "stale" not in out.read_text().lower() and "stale" not in capsys.readouterr().err
    assert summary_main(["--out", str(out), str(fresh), str(old), str(unknown)]) == 0  # marked, not refused
    text = out.read_text()
    rows = {line.split("|")[4].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "(stale)" in rows["**22.2**"] and "(stale)" not in rows["**11.1**"] + rows["**33.3**"]
    assert "**Stale:** [eval-old](eval-old/report.md) measured an earlier version" in text
    assert "eval-old/report.json" in capsys.readouterr().err
    assert summary_main(["--out", str(out), "--check", str(fresh), str(old)]) == 1
    assert summary_main(["--out", str(out), "--check", str(fresh), str(unknown)]) == 0
    # a --list can mark reports stale: shown so even where the fingerprints cannot tell, and known to --check
    listing = tmp_path / "list.txt"
    listing.write_text(f"{fresh}\n{old}  # stale: rerun queued\n{unknown}  # stale: an earlier bundle\n")
    capsys.readouterr()
    assert summary_main(["--out", str(out), "--check", "--list", str(listing)]) == 0
    rows = {line.split("|")[4].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert "(stale)" in rows["**22.2**"] and "(stale)" in rows["**33.3**"] and "(stale)" not in rows["**11.1**"]
    assert "stale" not in capsys.readouterr().err


def test_a_report_older_than_the_fingerprint_is_judged_by_its_bundle_in_git(toy_bundle, tmp_path, monkeypatch):
    import subprocess

    from training.evaluate.summary import freshness

    repo = toy_bundle.parent
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "bundle"], check=True)
    rev = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    report = {"bundle": toy_bundle.name, "provenance": {"git_revision": rev}}
    assert freshness(report) == "current"
    assert freshness({**report, "provenance": {"git_revision": rev + "+dirty"}}) == "unknown"  # not what was committed
    assert freshness({**report, "provenance": {"git_revision": "0" * 40}}) == "unknown"
    manifest = toy_bundle / "manifest.json"
    data = json.loads(manifest.read_text())
    data["members"][0]["detectors"][0]["threshold"] *= 1.01
    manifest.write_text(json.dumps(data))
    assert freshness(report) == "stale"


def test_the_shipped_evaluation_page_says_which_reports_measured_an_earlier_bundle(monkeypatch):
    """A report that docs/results/evaluation.md shows and that measured an earlier version of its bundle
    is listed with a '# stale' comment (the page marks it too), and a report so marked is stale: the mark
    goes when the report is rerun. Where it cannot be told (a shallow clone and a report older than the
    recorded fingerprint), it is not judged."""
    from training.evaluate.summary import freshness

    monkeypatch.chdir(ROOT)
    listing = ROOT / "docs" / "results" / "evaluation-reports.txt"
    listed = {line: "# stale" in raw for raw in listing.read_text().splitlines()
              if (line := raw.split("#", 1)[0].strip())}
    assert len(listed) > 10
    judged = {line: freshness(json.loads((ROOT / line).read_text())) for line in listed}
    unmarked = [line for line, verdict in judged.items() if verdict == "stale" and not listed[line]]
    assert not unmarked, f"rerun these, or mark them '# stale' in {listing.name}: {unmarked}"
    fresh = [line for line, verdict in judged.items() if verdict == "current" and listed[line]]
    assert not fresh, f"these measured the bundle as it ships: take the '# stale' mark off: {fresh}"


def test_summary_list_keeps_every_report_it_names_and_refuses_missing_ones(tmp_path, capsys, monkeypatch):
    from training.evaluate.summary import main as summary_main

    source = json.loads((ROOT / "docs" / "results" / "eval-mnist-cw" / "report.json").read_text())
    for name, value in (("eval-x", 0.123), ("eval-x-round19", 0.987)):
        report = json.loads(json.dumps(source))
        report["rows"][0]["full_defense"] = value
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("# what ships\neval-x-round19/report.json  # the current round\n\n")
    out = tmp_path / "summary.md"
    assert summary_main(["--out", str(out), "--list", "list.txt"]) == 0
    text = out.read_text()
    assert "98.7" in text and "12.3" not in text and "superseded" not in capsys.readouterr().out
    (tmp_path / "list.txt").write_text("eval-x/report.json\neval-y/report.json\n")
    with pytest.raises(SystemExit):
        summary_main(["--out", str(out), "--list", "list.txt"])
    assert "eval-y/report.json" in capsys.readouterr().err


def test_the_confidence_curve_reuses_cached_examples_too(tmp_path, mnist, capsys):
    args = ["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--attacks", "--kappas", "0", "5",
            "--n-kappa", "3", "--carlini-steps", "1", "--carlini-iterations", "5", "--cache", str(tmp_path / "cache")]
    assert run.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # one per confidence
    assert run.main([*args, "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["carlini_confidence_curve"] for d in "ab")
    assert [p["confidence"] for p in a] == [0, 5] and [p["reused_examples"] for p in b] == [True, True]
    assert [p["full_defense"] for p in a] == [p["full_defense"] for p in b]


def test_the_plot_draws_a_full_strength_row_over_a_reduced_one_listed_first():
    from training.evaluate.summary import plotted_rows

    full = json.loads((ROOT / "docs" / "results" / "eval-mnist-cw" / "report.json").read_text())
    reduced_run = json.loads(json.dumps(full))
    row = reduced_run["rows"][0]
    assert row["attack"] == "carlini_l2" and row["params"]["max_iterations"] == 1000
    row["params"]["max_iterations"], row["full_defense"] = 100, 0.25
    rows = plotted_rows([(Path("a"), reduced_run), (Path("b"), full)], "mnist")
    assert rows[full["bundle"]]["carlini_l2"]["full_defense"] == full["rows"][0]["full_defense"] != 0.25
    assert plotted_rows([(Path("a"), reduced_run)], "mnist")[full["bundle"]]["carlini_l2"]["full_defense"] == 0.25


def test_the_plot_draws_a_faster_schedule_under_its_family_until_the_full_attack_comes():
    from training.evaluate.summary import plotted_rows

    fast = json.loads((ROOT / "docs" / "results" / "eval-mnist-cw-l0" / "report.json").read_text())
    full = json.loads((ROOT / "docs" / "results" / "eval-mnist-cw-l0-carlini" / "report.json").read_text())
    assert fast["rows"][0]["attack"] == "carlini_l0_fast" and full["rows"][0]["attack"] == "carlini_l0"
    assert fast["rows"][0]["full_defense"] != full["rows"][0]["full_defense"]
    drawn = plotted_rows([(Path("a"), fast)], "mnist")[fast["bundle"]]
    assert drawn["carlini_l0"]["full_defense"] == fast["rows"][0]["full_defense"] and "carlini_l0_fast" not in drawn
    drawn = plotted_rows([(Path("a"), fast), (Path("b"), full)], "mnist")[fast["bundle"]]
    assert drawn["carlini_l0"]["full_defense"] == full["rows"][0]["full_defense"]


def test_cache_by_device_splits_a_row_and_drops_the_gpu_examples_that_do_not_fool(tmp_path, mnist, capsys):
    """scripts/cache_by_device.py: groups a one-example-a-chunk row by the device each chunk names (older
    chunks, without one, are the CPU's) and, with --drop-unfooled, deletes that device's chunks whose
    example leaves the classifier right, so that a shard crafts them again."""
    import importlib.util

    from service.defense.core import Defense
    from training.bundles import run_batched
    from training.specs import load_for_manifest, spec_of_manifest

    spec_ = importlib.util.spec_from_file_location("cache_by_device", ROOT / "scripts" / "cache_by_device.py")
    split = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(split)
    cache = tmp_path / "cache"
    assert run.main(["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--attacks", "carlini_l0_fast",
                     "--n-carlini", "3", "--kappas", "--cache", str(cache), "--cache-chunk", "1",
                     "--cache-shard", "0/1", "--cache-slots", "3", "--out", str(tmp_path / "s")]) == 0
    defense = Defense(SHIPPED_MNIST)
    test = load_for_manifest(defense.manifest, DATA_DIR).test
    idx = np.flatnonzero(run_batched(defense.classifier, test.x).argmax(1) == test.y)[:3]
    attack = registry(spec_of_manifest(defense.manifest))["carlini_l0_fast"]
    files = [run._cache_file(cache, defense, attack, idx[k : k + 1]) for k in range(3)]
    kept = np.load(files[1])
    np.savez(files[1], x_adv=test.x[idx[1:2]], seconds=kept["seconds"], slots=kept["slots"], device="cuda")
    kept = np.load(files[2])
    np.savez(files[2], x_adv=kept["x_adv"], seconds=kept["seconds"])  # as the chunks before --cache-slots
    fools = run_batched(defense.classifier, np.concatenate([np.load(f)["x_adv"] for f in files])).argmax(1) != test.y[idx]
    assert fools[0] and not fools[1]
    out = tmp_path / "split.json"
    args = ["--bundle", str(SHIPPED_MNIST), "--data-dir", str(DATA_DIR), "--cache", str(cache), "--attack",
            "carlini_l0_fast", "--n-carlini", "3", "--out", str(out)]
    assert split.main(args) == 0
    groups = json.loads(out.read_text())["groups"]
    assert (groups["cpu"]["examples"], groups["cuda"]["examples"]) == (2, 1)
    assert groups["cuda"]["unfooled"] == [1] and groups["cuda"]["no_defense"] == 1.0
    assert groups["cuda"]["unfooled_lead"][0] > 0
    assert len(groups["cpu"]["unfooled_lead"]) == 2 - groups["cpu"]["fool_classifier"]
    assert groups["cpu"]["fool_classifier"] == int(fools[0]) + int(fools[2])
    assert split.main([*args, "--drop-unfooled", "cuda"]) == 0
    assert [f.exists() for f in files] == [True, False, True]
    assert json.loads(out.read_text())["dropped"] == {"device": "cuda", "examples": [1]}
    with pytest.raises(SystemExit, match="not in the cache"):
        split.main(args)

"""The classifier-guided reformer: its training attacks, its training loop (resumable) and its recipe."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.defense import Defense, read_manifest  # noqa: E402
from training.attacks.pgd import fgsm, pgd_linf  # noqa: E402
from training.data import Split  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.from_onnx import torch_twin  # noqa: E402
from training.nets import GuidedReformer, MagnetAE32, ResNet9  # noqa: E402
from service.defense.domain import jpeg_round_trip  # noqa: E402
from training.reformer import ReformerConfig, _lr, kinds_for, parse_mix, perturb, train_reformer  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402


def _tiny_classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ResNet9(width=4).eval()


def _data(n: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.uniform(size=(n, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64))


def test_attacks_stay_in_their_per_example_ball_and_raise_the_loss():
    model = _tiny_classifier()
    x = torch.rand(6, 3, 32, 32)
    y = model(x).argmax(1)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.05, 0.1])
    loss = lambda z: torch.nn.functional.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    for x_adv in (fgsm(model, x, y, eps), pgd_linf(model, x, y, eps, steps=5, generator=torch.Generator().manual_seed(0))):
        dist = (x_adv - x).abs().flatten(1).max(1).values
        assert torch.all(dist <= eps + 1e-6) and x_adv.min() >= 0 and x_adv.max() <= 1
        assert torch.equal(x_adv[0], x[0])  # eps 0 moves nothing
        assert torch.all(loss(x_adv)[3:] > loss(x)[3:])


def test_mix_is_parsed_and_split_in_proportion():
    assert parse_mix("fgsm=1,pgd=3") == {"fgsm": 1.0, "pgd": 3.0}
    kinds = kinds_for(128, {"fgsm": 1.0, "pgd": 3.0}, torch.Generator().manual_seed(0))
    assert kinds.count("fgsm") == 32 and kinds.count("pgd") == 96
    with pytest.raises(ValueError, match="mix"):
        ReformerConfig(mix={"blur": 1.0})


def test_perturbations_of_each_kind_stay_within_their_budget():
    model, gen = _tiny_classifier(), torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 32, 32)
    y = model(x).argmax(1)
    cfg = ReformerConfig(mix={"clean": 1, "fgsm": 1, "pgd": 1}, eps_max=0.03, bf16=False)
    kinds = ["clean"] * 4 + ["fgsm"] * 4 + ["pgd"] * 4
    out = perturb(model, x, y, kinds, cfg, gen)
    dist = (out - x).abs().flatten(1).max(1).values
    assert torch.equal(out[:4], x[:4]) and torch.all(dist <= 0.03 + 1e-6) and torch.all(dist[4:] > 0)


def test_preimage_copies_compress_back_to_the_training_image():
    """``preimage`` copies are uncompressed images JPEG would turn into the (JPEG) training image: not
    attacks, and far from the image in pixels, yet within a JPEG round trip's rounding of it."""
    model, gen = _tiny_classifier(), torch.Generator().manual_seed(0)
    x = torch.from_numpy(jpeg_round_trip(np.random.default_rng(0).uniform(size=(6, 3, 32, 32)).astype(np.float32), 75))
    cfg = ReformerConfig(mix={"preimage": 1}, preimage_max=0.5, bf16=False)
    out = perturb(model, x, model(x).argmax(1), ["clean"] + ["preimage"] * 5, cfg, gen)
    assert torch.equal(out[0], x[0]) and out.min() >= 0 and out.max() <= 1
    moved = (out[1:] - x[1:]).abs().flatten(1).mean(1)
    back = np.abs(jpeg_round_trip(out[1:].numpy(), 75) - x[1:].numpy()).mean(axis=(1, 2, 3))
    assert torch.all(moved > 0) and np.all(back < moved.numpy())


def test_attacks_from_a_preimage_start_there_and_stay_within_their_budget():
    """``fgsm_pre`` / ``pgd_pre``: the attack starts from a pre-image of the JPEG training image (an attacker
    who holds the uncompressed original), so the copy is within eps of that pre-image, not of the JPEG."""
    model, gen = _tiny_classifier(), torch.Generator().manual_seed(0)
    x = torch.from_numpy(jpeg_round_trip(np.random.default_rng(1).uniform(size=(8, 3, 32, 32)).astype(np.float32), 75))
    cfg = ReformerConfig(mix={"fgsm_pre": 1, "pgd_pre": 1}, preimage_max=0.5, eps_max=0.01, bf16=False)
    out = perturb(model, x, model(x).argmax(1), ["fgsm_pre"] * 4 + ["pgd_pre"] * 4, cfg, gen)
    assert out.min() >= 0 and out.max() <= 1
    linf = (out - x).abs().flatten(1).max(1).values
    assert torch.all(linf > 0.01 + 1e-6)  # the pre-image's detail plus the attack: beyond eps from the JPEG
    # compressed again, each copy lands nearer the JPEG image than it is (the pre-image part is undone)
    back = np.abs(jpeg_round_trip(out.numpy(), 75) - x.numpy()).mean(axis=(1, 2, 3))
    assert np.all(back < (out - x).abs().flatten(1).mean(1).numpy())


def test_original_kinds_start_from_the_rows_originals_and_attacks_stay_within_eps_of_them():
    model, gen = _tiny_classifier(), torch.Generator().manual_seed(0)
    x = torch.rand(9, 3, 32, 32)
    originals = (x + 0.05 * torch.randn(x.shape)).clamp(0, 1)
    cfg = ReformerConfig(mix={"original": 1, "fgsm_orig": 1, "pgd_orig": 1}, eps_max=0.01, bf16=False)
    kinds = ["original"] * 3 + ["fgsm_orig"] * 3 + ["pgd_orig"] * 3
    out = perturb(model, x, model(x).argmax(1), kinds, cfg, gen, originals)
    assert torch.equal(out[:3], originals[:3])  # not an attack: the original itself
    assert torch.all((out[3:] - originals[3:]).abs().flatten(1).max(1).values <= 0.01 + 1e-6)
    assert torch.all((out[3:] - x[3:]).abs().flatten(1).max(1).values > 0.02)  # far from the JPEG row
    with pytest.raises(ValueError, match="originals"):
        perturb(model, x, model(x).argmax(1), kinds, cfg, gen)


def test_training_draws_the_original_kinds_from_the_images_that_have_one(tmp_path, monkeypatch):
    import training.reformer as R

    classifier, train, val = _tiny_classifier(), _data(64), _data(500, seed=1)
    rows = np.array([3, 10, 41])
    originals = (rows, np.clip(train.x[rows] + 0.03, 0, 1).astype(np.float32))
    seen = []
    real = R.perturb

    def spy(classifier, x, y, kinds, cfg, gen, xo=None, through=None):
        seen.append((x.clone(), list(kinds), None if xo is None else xo.clone()))
        return real(classifier, x, y, kinds, cfg, gen, xo, through)

    monkeypatch.setattr(R, "perturb", spy)
    cfg = ReformerConfig(width=8, depth=1, steps=2, batch_size=16, mix={"fgsm": 1, "original": 1}, bf16=False, val_every=1)
    train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, cfg, tmp_path / "a", originals=originals)
    for x, kinds, xo in seen:
        for i, k in enumerate(kinds):
            if k == "original":  # the row is one of the three images, and its original rides along
                j = [r for r in rows if np.array_equal(train.x[r], x[i].numpy())]
                assert len(j) == 1 and np.allclose(xo[i].numpy(), originals[1][list(rows).index(j[0])])
            else:
                assert torch.equal(xo[i], x[i])
    assert sum(k == "original" for _, kinds, _ in seen for k in kinds) == 16
    with pytest.raises(ValueError, match="originals"):
        train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, cfg, tmp_path / "b")


def test_augmentation_moves_an_image_and_its_original_alike_and_retargets_the_classifier(tmp_path, monkeypatch):
    import training.reformer as R

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    xo = (x + 0.01 * torch.randn(x.shape)).clamp(0, 1)
    a, ao = R.augment_pair(x, xo, gen, 4, True)
    assert a.shape == x.shape and ao.shape == xo.shape
    moved = [i for i in range(len(x)) if not torch.equal(a[i], x[i])]
    assert len(moved) > 48  # 81 crops x 2 flips: nearly every image moves
    for i in range(len(x)):  # the original moved exactly as its image: their difference is the same pixels'
        assert float((ao[i] - a[i]).abs().max()) <= float((xo[i] - x[i]).abs().max()) + 1e-6
        assert torch.allclose((ao[i] - a[i]).abs().sum(), (xo[i] - x[i]).abs().sum(), rtol=0.35)
    flip_only, _ = R.augment_pair(x, None, torch.Generator().manual_seed(1), 0, True)
    assert all(torch.equal(flip_only[i], x[i]) or torch.equal(flip_only[i], x[i].flip(2)) for i in range(len(x)))
    assert any(not torch.equal(flip_only[i], x[i]) for i in range(len(x)))
    with pytest.raises(ValueError, match="augment_pad"):
        ReformerConfig(augment_pad=-1)

    # in training, the targets are the classifier's logits on the moved images, not the stored ones
    classifier, train, val = _tiny_classifier(), _data(64), _data(500, seed=1)
    seen = []
    real = R._kl

    def spy(target, logits, t):
        seen.append(target.detach().clone())
        return real(target, logits, t)

    monkeypatch.setattr(R, "_kl", spy)
    stored = R.predict_logits(classifier, train.x, batch_size=500)
    for pad, flip, retargeted in ((0, False, False), (2, True, True)):
        seen.clear()
        cfg = ReformerConfig(width=8, depth=1, steps=1, batch_size=16, mix={"noise": 1}, bf16=False,
                             augment_pad=pad, augment_flip=flip, val_every=100)
        train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, cfg, tmp_path / f"w{pad}")
        rows = seen[0][:16].numpy()
        from_store = [any(np.allclose(r, s, atol=1e-5) for s in stored) for r in rows]
        assert all(from_store) != retargeted and (not retargeted or sum(from_store) < 8)


def test_reformer_starts_as_the_identity_and_exports_to_a_verified_twin(tmp_path):
    model = GuidedReformer(3, 8, 2).eval()
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), x)
    torch.nn.init.normal_(model.out.weight, std=0.1)
    export_onnx(model, tmp_path / "r.onnx", (3, 32, 32), "output")
    twin = torch_twin(tmp_path / "r.onnx", "cifar10", "autoencoder", (3, 32, 32))
    assert isinstance(twin, GuidedReformer) and (twin.width, twin.depth) == (8, 2)
    ae = MagnetAE32(3, 8, bottleneck=True).eval()
    export_onnx(ae, tmp_path / "a.onnx", (3, 32, 32), "output")
    assert torch_twin(tmp_path / "a.onnx", "cifar10", "autoencoder", (3, 32, 32)).layers[1].__class__.__name__ == "AvgPool2d"


def test_training_lowers_the_loss_and_resumes_where_it_stopped(tmp_path):
    classifier, train, val = _tiny_classifier(), _data(256), _data(64, seed=1)
    cfg = ReformerConfig(width=8, depth=1, steps=6, batch_size=16, val_every=3, mix={"noise": 1, "fgsm": 1},
                         bf16=False, lr=1e-2)
    first = train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, ReformerConfig(**{**cfg.__dict__, "steps": 3}),
                           tmp_path)
    assert [r["step"] for r in first["rows"]] == [3] and first["finished"]
    model = GuidedReformer(3, 8, 1)
    second = train_reformer(model, classifier, train, val, cfg, tmp_path)
    assert [r["step"] for r in second["rows"]] == [3, 6] and second["finished"]
    assert json.loads((tmp_path / "reformer.history.json").read_text())["rows"][-1]["step"] == 6
    assert not torch.equal(model(torch.rand(1, 3, 32, 32) * 0 + 0.5), torch.full((1, 3, 32, 32), 0.5))


def test_a_time_schedule_decays_by_training_time_and_ends_the_run_short_of_its_steps(tmp_path):
    cfg = ReformerConfig(width=8, depth=1, steps=1000, lr=1e-2, schedule_minutes=1.0, bf16=False)
    # past the warm-up (100 steps) the decay follows whichever of steps and time is further along
    assert _lr(cfg, 100, seconds=0.0) == pytest.approx(1e-2)
    assert _lr(cfg, 100, seconds=30.0) == pytest.approx(1e-2 * (0.05 + 0.95 * 0.5))
    assert _lr(cfg, 100, seconds=60.0) == pytest.approx(1e-2 * 0.05)
    assert _lr(cfg, 550, seconds=0.0) == pytest.approx(_lr(cfg, 100, seconds=30.0))
    assert _lr(ReformerConfig(steps=1000, lr=1e-2, bf16=False), 100, seconds=60.0) == pytest.approx(1e-2)
    classifier, train, val = _tiny_classifier(), _data(256), _data(64, seed=1)
    run = ReformerConfig(width=8, depth=1, steps=100000, batch_size=16, val_every=1000, mix={"noise": 1},
                         bf16=False, lr=1e-2, schedule_minutes=0.01)
    history = train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, run, tmp_path)
    last = history["rows"][-1]
    assert history["finished"] and 100 <= last["step"] < 100000
    assert last["lr"] <= 0.5 * run.lr and history["seconds"] >= 0.6
    again = train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, run, tmp_path)  # resumes: nothing left
    assert again["finished"] and again["rows"][-1]["step"] == last["step"]


def test_the_quiet_term_counts_the_rows_that_are_not_attacks_only(tmp_path):
    """--quiet-weight: T^2 KL at the detector's temperature on clean and non-attack copies. The reformer
    starts as the identity, so on the first step the term is zero when the only copies are attacks (the
    clean rows reform to themselves) and positive when noisy copies join it."""
    class Loud(torch.nn.Module):  # the tiny random classifier's logits are nearly equal: spread them out
        def __init__(self) -> None:
            super().__init__()
            self.f = _tiny_classifier()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 1000 * self.f(x)

    classifier, train, val = Loud().eval(), _data(128), _data(32, seed=1)
    cfg = ReformerConfig(width=8, depth=1, steps=1, batch_size=16, val_every=1, mix={"fgsm": 1}, bf16=False,
                         lr=1e-2, quiet_weight=1.0, eps_max=0.1)
    attacks_only = train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, cfg, tmp_path / "a")["rows"][0]
    assert attacks_only["quiet"] == pytest.approx(0.0, abs=1e-9) and attacks_only["kl"] > 0
    noisy = ReformerConfig(**{**cfg.__dict__, "mix": {"fgsm": 1, "noise": 1}, "noise_max": 0.3})
    with_noise = train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, noisy, tmp_path / "b")["rows"][0]
    assert with_noise["quiet"] > 1e-6, with_noise
    # quiet_rows "preimage": the noisy copies no longer count, the clean pre-image copies do
    only_pre = ReformerConfig(**{**noisy.__dict__, "quiet_rows": "preimage"})
    assert train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, only_pre,
                          tmp_path / "d")["rows"][0]["quiet"] == 0.0
    pre = ReformerConfig(**{**only_pre.__dict__, "mix": {"fgsm": 1, "preimage": 1}})
    assert train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, pre, tmp_path / "e")["rows"][0]["quiet"] > 1e-6
    with pytest.raises(ValueError):
        ReformerConfig(quiet_rows="attacks")
    off = ReformerConfig(**{**noisy.__dict__, "quiet_weight": 0.0})
    assert "quiet" not in train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, off, tmp_path / "c")["rows"][0]


def test_a_warm_start_takes_the_weights_but_a_fresh_schedule(tmp_path):
    classifier, train, val = _tiny_classifier(), _data(128), _data(32, seed=1)
    cfg = ReformerConfig(width=8, depth=1, steps=3, batch_size=8, val_every=3, mix={"fgsm": 1}, bf16=False, lr=1e-2)
    first = GuidedReformer(3, 8, 1)
    train_reformer(first, classifier, train, val, cfg, tmp_path / "a")
    warm = GuidedReformer(3, 8, 1)
    train_reformer(warm, classifier, train, val, ReformerConfig(**{**cfg.__dict__, "steps": 0}), tmp_path / "b",
                   init_from=tmp_path / "a" / "reformer.ckpt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(warm(x), first(x))  # no step taken: exactly the weights it started from
    second = train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, cfg, tmp_path / "c",
                            init_from=tmp_path / "a" / "reformer.ckpt")
    assert [r["step"] for r in second["rows"]] == [3]  # its own schedule, from step 0
    assert second["init_from"].endswith("reformer.ckpt")


def test_smoke_guided_recipe_writes_a_bundle_on_the_shared_classifier(tmp_path, cifar10):
    from training import build_guided

    classifier = tmp_path / "models" / "shared" / "tiny.onnx"
    classifier.parent.mkdir(parents=True)
    export_onnx(_tiny_classifier(), classifier, (3, 32, 32), "logits")
    out = tmp_path / "models" / "guided"
    args = ["--data-dir", str(DATA_DIR), "--classifier", str(classifier), "--work-dir", str(tmp_path / "w"),
            "--out", str(out), "--width", "8", "--depth", "1", "--steps", "2", "--batch-size", "8",
            "--mix", "fgsm=1,pgd=1", "--train-limit", "200", "--candidate", "--jpeg-quality", "auto",
            "--augment-flip"]
    assert build_guided.main(args) == 0
    manifest = read_manifest(out)
    assert manifest.classifier.file == "../shared/tiny.onnx"
    assert manifest.measurements["reformer"]["trained_on_adversarial_examples"] is True
    assert manifest.measurements["reformer"]["augment"] == {"pad": 0, "flip": True}
    assert "defense_clean_test_accuracy" not in manifest.measurements  # a candidate touches no test image
    assert {d.name for d in manifest.members[0].detectors} == {"recon", "jsd_t10", "jsd_t40"}
    verdict = Defense(out).inspect(cifar10.val.x[:16])
    assert verdict.reformed.shape == (16, 3, 32, 32)
    # trained as served: the data's JPEG quality is the bundle's input step and the training inputs' too
    assert manifest.input.jpeg_quality == 75
    assert json.loads((tmp_path / "w" / "config.json").read_text())["reformer"]["jpeg_quality"] == 75


def test_a_diverse_pool_trains_jointly_and_resumes(tmp_path):
    classifier, train, val = _tiny_classifier(), _data(128), _data(32, seed=1)
    cfg = ReformerConfig(width=8, depth=1, steps=4, batch_size=8, val_every=2, mix={"noise": 1}, bf16=False, lr=1e-2)
    pool = [GuidedReformer(3, 8, 1) for _ in range(3)]
    history = train_reformer(pool, classifier, train, val, cfg, tmp_path, alpha=1.0)
    assert [r["step"] for r in history["rows"]] == [2, 4] and history["rows"][-1]["diversity"] > 0
    x = torch.rand(2, 3, 32, 32)
    outs = [m(x) for m in pool]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    with pytest.raises(ValueError, match="holds 3 reformers"):
        train_reformer([GuidedReformer(3, 8, 1)] * 2, classifier, train, val, cfg, tmp_path)


def test_smoke_guided_pool_recipe_calibrates_each_member(tmp_path, cifar10):
    from training import build_guided

    classifier = tmp_path / "shared" / "tiny.onnx"
    classifier.parent.mkdir(parents=True)
    export_onnx(_tiny_classifier(), classifier, (3, 32, 32), "logits")
    out = tmp_path / "pool"
    assert build_guided.main(["--data-dir", str(DATA_DIR), "--classifier", str(classifier), "--work-dir",
                              str(tmp_path / "w"), "--out", str(out), "--width", "8", "--depth", "1", "--steps", "2",
                              "--batch-size", "8", "--members", "2", "--alpha", "1", "--train-limit", "200",
                              "--figures-limit", "40", "--recon-fpr", "0.01", "--jsd-fpr", "0.02", "0"]) == 0
    manifest = read_manifest(out)
    assert [m.reformer for m in manifest.members] == ["reformer_0.onnx", "reformer_1.onnx"]
    assert [[d.name for d in m.detectors] for m in manifest.members] == [["recon", "jsd_t10"]] * 2
    assert manifest.members[0].detectors[0].threshold != manifest.members[1].detectors[0].threshold
    assert set(manifest.measurements["member_clean_figures"]) == {"member-0", "member-1"}
    assert manifest.measurements["reformer"]["trained_on_adversarial_examples"] is False


def test_member_attacks_are_crafted_through_the_member_and_stay_within_their_budget():
    model, gen = _tiny_classifier(), torch.Generator().manual_seed(0)
    member = GuidedReformer(3, 8, 1)
    torch.nn.init.normal_(member.out.weight, std=0.5)  # a member that changes its input, unlike the identity
    through = torch.nn.Sequential(member, model).eval()
    x = torch.rand(8, 3, 32, 32)
    y = through(x).argmax(1)
    cfg = ReformerConfig(mix={"pgd": 1, "pgd_member": 1}, eps_max=0.05, bf16=False)
    kinds = ["pgd_member"] * 8
    with pytest.raises(ValueError, match="pgd_member"):
        perturb(model, x, y, kinds, cfg, torch.Generator().manual_seed(0))
    aimed = perturb(model, x, y, kinds, cfg, torch.Generator().manual_seed(0), through=through)
    plain = perturb(model, x, y, ["pgd"] * 8, cfg, torch.Generator().manual_seed(0))
    assert torch.all((aimed - x).abs().flatten(1).max(1).values <= 0.05 + 1e-6)
    assert not torch.equal(aimed, plain)  # the same draws, another model's gradient
    loss = lambda m, z: torch.nn.functional.cross_entropy(m(z), y)  # noqa: E731
    assert loss(through, aimed) > loss(through, plain)
    with pytest.raises(ValueError, match="member_attack"):
        ReformerConfig(member_attack="self")


def test_with_member_attack_others_the_crafting_member_does_not_learn_from_its_own_attack(tmp_path):
    """Two members that start alike get the same gradients, and stay alike, when every member learns from
    the pgd_member copies; when the member they were crafted through leaves them out, they part."""
    classifier, train, val = _tiny_classifier(), _data(128), _data(32, seed=1)
    cfg = ReformerConfig(width=8, depth=1, steps=1, batch_size=8, val_every=1, mix={"pgd_member": 1}, bf16=False,
                         lr=1e-2, eps_max=0.1)
    seed = GuidedReformer(3, 8, 1)
    torch.nn.init.normal_(seed.out.weight, std=0.1)
    x = torch.rand(4, 3, 32, 32)

    def pool_after(member_attack: str, work: str) -> list[torch.Tensor]:
        pool = [GuidedReformer(3, 8, 1) for _ in range(2)]
        for m in pool:
            m.load_state_dict(seed.state_dict())
        run = ReformerConfig(**{**cfg.__dict__, "member_attack": member_attack})
        train_reformer(pool, classifier, train, val, run, tmp_path / work)
        with torch.no_grad():
            return [m(x) for m in pool]

    alike = pool_after("all", "all")
    assert torch.equal(alike[0], alike[1])
    apart = pool_after("others", "others")
    assert not torch.equal(apart[0], apart[1])


def test_one_reformer_seeds_a_pool_only_with_a_spread_and_the_members_then_differ(tmp_path):
    classifier, train, val = _tiny_classifier(), _data(128), _data(32, seed=1)
    cfg = ReformerConfig(width=8, depth=1, steps=2, batch_size=8, val_every=2, mix={"fgsm": 1}, bf16=False, lr=1e-2)
    single = GuidedReformer(3, 8, 1)
    torch.nn.init.normal_(single.out.weight, std=0.1)
    train_reformer(single, classifier, train, val, cfg, tmp_path / "one")
    ckpt = tmp_path / "one" / "reformer.ckpt"
    with pytest.raises(ValueError, match="init_spread"):
        train_reformer([GuidedReformer(3, 8, 1) for _ in range(3)], classifier, train, val, cfg, tmp_path / "bad",
                       init_from=ckpt)
    pool = [GuidedReformer(3, 8, 1) for _ in range(3)]
    zero = ReformerConfig(**{**cfg.__dict__, "steps": 0})
    history = train_reformer(pool, classifier, train, val, zero, tmp_path / "pool", init_from=ckpt, init_spread=0.05)
    assert history["init_spread"] == 0.05
    x = torch.rand(4, 3, 32, 32)
    outs = [m(x) for m in pool]
    base = single(x)
    for k, out in enumerate(outs):  # near the seed, each a little off it, and no two alike
        assert 0 < (out - base).abs().max() < 0.1
        for other in outs[k + 1:]:
            assert not torch.equal(out, other)


def test_a_shipped_bundle_warm_starts_a_run_with_its_members_weights(tmp_path):
    """Checkpoints do not ship, bundles do: --init-from models/cifar10-pool starts each member from that
    member's reformer as onnxruntime computes it (here after zero steps)."""
    from service.defense.runtime import CPU, OnnxModel
    from training.build_guided import init_checkpoint
    from tests.procs import REPO

    bundle = REPO / "models" / "cifar10-pool"
    ckpt = init_checkpoint(bundle, tmp_path)
    assert ckpt == tmp_path / "init.ckpt"
    assert init_checkpoint(ckpt, tmp_path) == ckpt  # a checkpoint is taken as it is
    pool = [GuidedReformer(3, 32, 2) for _ in range(8)]
    zero = ReformerConfig(width=32, depth=2, steps=0, batch_size=8, mix={"noise": 1}, bf16=False)
    train_reformer(pool, _tiny_classifier(), _data(16), _data(8, seed=1), zero, tmp_path / "w", init_from=ckpt)
    x = np.random.default_rng(3).uniform(size=(4, 3, 32, 32)).astype(np.float32)
    outs = []
    for k, m in enumerate(pool):
        with torch.no_grad():
            out = m.eval()(torch.from_numpy(x)).numpy()
        assert np.abs(out - OnnxModel(bundle / f"reformer_{k}.onnx", [CPU])(x)).max() < 1e-4
        outs.append(out)
    assert not np.array_equal(outs[0], outs[1])  # each member its own weights, in order
    with pytest.raises(SystemExit, match="not a classifier-guided reformer"):
        init_checkpoint(REPO / "models" / "cifar10-paper" / "ae.onnx", tmp_path)


def test_jpeg_inputs_are_the_cores_round_trip_and_off_without_a_quality():
    from service.defense.domain import jpeg_round_trip
    from training.reformer import jpeg_inputs

    x = torch.rand(3, 3, 32, 32)
    assert jpeg_inputs(x, None) is x
    np.testing.assert_array_equal(jpeg_inputs(x, 75).numpy(), jpeg_round_trip(x.numpy(), 75))


def test_bf16_only_where_the_hardware_has_it(monkeypatch):
    """bf16 autocast is emulated, about 25x slower, on a CPU without bf16 instructions: the configs' default
    follows /proc/cpuinfo, and an explicit choice stands."""
    from pathlib import Path

    from training import loops
    from training.loops import ClassifierConfig, native_bf16

    flags = {"text": "flags\t\t: fpu sse2 avx2\n"}
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: flags["text"])
    assert native_bf16("cpu") is False
    assert ReformerConfig().bf16 is False and ClassifierConfig().bf16 is False
    flags["text"] = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
    assert native_bf16("cpu") is True
    assert ReformerConfig().bf16 is True and ClassifierConfig(device="cpu").bf16 is True
    assert ReformerConfig(bf16=False).bf16 is False and ClassifierConfig(bf16=False).bf16 is False
    assert loops.native_bf16("meta") is False


def test_a_checkpoint_resumes_only_with_its_settings_and_its_classifier(tmp_path, capsys):
    """A work dir's checkpoint resumes under the same training settings (where and how long it runs may
    change; more steps are noted). Other settings are refused with what changed; so is another classifier,
    found by the cached outputs on the training images. Without a checkpoint, another classifier's cached
    outputs are computed anew."""
    classifier, train, val = _tiny_classifier(), _data(128), _data(32, seed=1)
    cfg = ReformerConfig(width=8, depth=1, steps=2, batch_size=16, val_every=2, mix={"noise": 1}, bf16=False)
    train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, cfg, tmp_path)
    same = ReformerConfig(**{**cfg.__dict__, "steps": 3, "max_minutes": 5.0, "val_every": 1})
    assert train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, same, tmp_path)["rows"][-1]["step"] == 3
    assert "resuming with steps 2 -> 3" in capsys.readouterr().out
    other = ReformerConfig(**{**same.__dict__, "kl_weight": 2.0, "mix": {"fgsm": 1}})
    with pytest.raises(SystemExit, match=r"trained with other settings \(kl_weight 1.0 -> 2.0; mix \{'noise': 1\} -> "
                                         r"\{'fgsm': 1\}\): give --fresh"):
        train_reformer(GuidedReformer(3, 8, 1), classifier, train, val, other, tmp_path)
    with pytest.raises(SystemExit, match="trained through another classifier"):
        train_reformer(GuidedReformer(3, 8, 1), _tiny_classifier(seed=1), train, val, same, tmp_path)
    (tmp_path / "reformer.ckpt").unlink()  # no checkpoint: the other classifier's outputs replace the cache
    train_reformer(GuidedReformer(3, 8, 1), _tiny_classifier(seed=1), train, val, cfg, tmp_path)
    assert "holds another classifier's outputs; computing them anew" in capsys.readouterr().out
    from training.loops import predict_logits

    np.testing.assert_allclose(np.load(tmp_path / "train_logits.npy"), predict_logits(_tiny_classifier(seed=1), train.x),
                               rtol=1e-5, atol=1e-6)

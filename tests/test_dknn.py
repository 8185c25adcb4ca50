"""Deep k-NN credibility and the image-quilting defense, on the digits small CNNs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks import build_attack
from gauntlet.workers.attacks.base import Threat
from gauntlet.workers.datasets import eval_subset, load_split
from gauntlet.workers.defenses import DEFENSES, build_defense
from gauntlet.workers.defenses.dknn_index import DeepKNN
from gauntlet.workers.defenses.quilting import Quilting, patch_database
from gauntlet.workers.models import InputSpec, load_classifier

SPEC = InputSpec(1, 8, 8, 10)
N_TEST = 200


@pytest.fixture(scope="module")
def standard(digits_models) -> nn.Module:
    return load_classifier(digits_models["standard"], "small-cnn", SPEC)


@pytest.fixture(scope="module")
def dknn(standard) -> DeepKNN:
    x, y = load_split("digits", "train", None)
    return DeepKNN(standard, x, y)


@pytest.fixture(scope="module")
def test_points() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = eval_subset("digits", N_TEST, 0, None)
    return x, y


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ---------------------------------------------------------------------------- DkNN


def test_hand_built_p_values():
    # 2-D features (second coordinate 0) read from one layer, k=3. Train: class 0 at
    # x=0,1,2; class 1 at x=3.2,10,11,12. Calibration nonconformities (by hand):
    #   1.5/y0 -> {1,2,0}: 0 | 11/y1 -> {10,11,12}: 0 | 2.5/y0 -> {2,3.2,1}: 1
    #   6.4/y1 -> {3.2,10,2}: 1 | 1.5/y1 -> {1,2,0}: 3          => A = {0, 0, 1, 1, 3}
    net = nn.Sequential(nn.Identity())

    def pts(*xs: float) -> torch.Tensor:
        return torch.tensor([[v, 0.0] for v in xs])

    x_train, y_train = pts(0, 1, 2, 3.2, 10, 11, 12), torch.tensor([0, 0, 0, 1, 1, 1, 1])
    x_cal, y_cal = pts(1.5, 11, 2.5, 6.4, 1.5), torch.tensor([0, 1, 0, 1, 1])
    model = DeepKNN(net, x_train, y_train, x_cal, y_cal, layers=["0"], k=3)
    assert model.calibration.tolist() == [0, 0, 1, 1, 3]

    pred, cred, conf, p = model.predict(pts(1.5, 3.0, 6.4))
    # 1.5: alpha = (0, 3) -> p = (5/5, 1/5). 3.0: neighbours {3.2,2,1}, alpha = (1, 2)
    # -> p = (3/5, 1/5). 6.4: neighbours {3.2,10,2}, alpha = (2, 1) -> p = (1/5, 3/5).
    expected = torch.tensor([[1.0, 0.2], [0.6, 0.2], [0.2, 0.6]], dtype=torch.float64)
    assert torch.allclose(p, expected)
    assert pred.tolist() == [0, 0, 1]
    assert torch.allclose(cred, torch.tensor([1.0, 0.6, 0.6], dtype=torch.float64))
    assert torch.allclose(conf, torch.tensor([0.8, 0.8, 0.8], dtype=torch.float64))


def test_bad_arguments_raise():
    net = nn.Sequential(nn.Identity())
    x, y = torch.zeros(10, 2), torch.zeros(10, dtype=torch.long)
    with pytest.raises(GauntletError, match="k="):
        DeepKNN(net, x, y, x, y, layers=["0"], k=11)
    with pytest.raises(GauntletError, match="Unknown layer"):
        DeepKNN(net, x, y, x, y, layers=["nope"], k=1)
    with pytest.raises(GauntletError, match="k"):
        DeepKNN(net, x, y, x, y, layers=["0"], k=0)


def test_default_layers_of_small_cnn(dknn, standard):
    # pool (after relu(conv1)), grid (after relu(conv2)), and the input of fc2.
    assert [m for m, _ in dknn.layers] == [standard.net.pool, standard.net.grid, standard.net.fc2]
    assert [f.shape[1] for f in dknn.train_features] == [32 * 16, 64 * 16, 128]
    assert len(dknn.calibration) == len(load_split("digits", "train", None)[1]) // 3


def test_p_values_on_the_calibration_grid(dknn, test_points):
    x, _ = test_points
    p = dknn.predict(x[:50])[3]
    size = len(dknn.calibration)
    scaled = p * size
    # Counts divided by |A| in float64: integers again up to rounding far below 1e-9.
    assert (scaled - scaled.round()).abs().max() < 1e-9
    assert len(torch.unique(scaled.round())) > 2  # not trivially all 0 or |A|
    assert p.min() >= 0 and p.max() <= 1
    # Some label always has a small nonconformity on a clean digit: p-values are not all 0.
    assert (p.max(1).values > 0).all()


def test_dknn_accuracy_close_to_model_and_credibility_drops_under_fgsm(dknn, standard, test_points):
    x, y = test_points
    pred, cred, _, _ = dknn.predict(x)
    dknn_acc = (pred == y).float().mean().item()
    model_acc = _accuracy(standard, x, y)
    print(f"model acc {model_acc:.3f}, DkNN acc {dknn_acc:.3f}")
    assert model_acc > 0.85
    assert abs(dknn_acc - model_acc) <= 0.05

    x_adv = build_attack("fgsm")(standard, x, y, Threat("linf", 0.2)).x_adv
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6
    cred_adv = dknn.predict(x_adv)[1]
    print(f"mean credibility clean {cred.mean():.3f}, FGSM {cred_adv.mean():.3f}")
    assert cred_adv.mean() <= cred.mean() - 0.15


@pytest.mark.parametrize(
    ("arch", "names", "widths"),
    [
        # Stage outputs pooled to at most 4x4 (32x32 input; torchvision's stem divides by
        # 4), then the input of the classifier (the pooled penultimate features).
        (
            "torchvision:resnet18",
            ["layer1", "layer2", "layer3", "layer4", "fc"],
            [64 * 16, 128 * 16, 256 * 4, 512, 512],
        ),
        ("wrn-10-1", ["block1", "block2", "block3", "fc"], [16 * 16, 32 * 16, 64 * 16, 64]),
        (
            "preact-resnet18",
            ["layer1", "layer2", "layer3", "layer4", "linear"],
            [64 * 16, 128 * 16, 256 * 16, 512 * 16, 512],
        ),
    ],
)
def test_default_layers_of_residual_networks_fire_once(arch, names, widths):
    from gauntlet.workers.architectures import build_architecture

    torch.manual_seed(0)
    net = build_architecture(arch, InputSpec(3, 32, 32, 10)).eval()
    x, y = torch.rand(30, 3, 32, 32), torch.arange(30) % 10
    knn = DeepKNN(net, x, y, calibration_size=10, k=3)
    modules = dict(net.named_modules())
    assert [m for m, _ in knn.layers] == [modules[name] for name in names]
    assert [f.shape for f in knn.train_features] == [(20, w) for w in widths]

    calls = {name: 0 for name in names}
    handles = [
        modules[name].register_forward_pre_hook(lambda *_, n=name: calls.update({n: calls[n] + 1}))
        for name in names
    ]
    feats = knn.features(x[:4])
    for handle in handles:
        handle.remove()
    assert calls == {name: 1 for name in names}  # one batch: each layer ran exactly once

    # The penultimate features are what the classifier reads: the logits follow from them.
    head = modules[names[-1]]
    with torch.no_grad():
        assert torch.allclose(head(feats[-1]), net(x[:4]), atol=1e-5)
    if arch.startswith("torchvision"):
        # Reference for a stage: torchvision's own stem and layer1, pooled to 4x4 by hand.
        with torch.no_grad():
            stem = net.maxpool(net.relu(net.bn1(net.conv1(x[:4]))))
            ref = nn.functional.adaptive_avg_pool2d(net.layer1(stem), 4).flatten(1)
        assert torch.allclose(feats[0], ref, atol=1e-5)


def test_a_reused_module_is_refused():
    from gauntlet.workers.architectures import build_architecture

    net = build_architecture("torchvision:resnet18", InputSpec(3, 32, 32, 10)).eval()
    x, y = torch.rand(12, 3, 32, 32), torch.arange(12) % 10
    # layer1.0.relu runs twice in each BasicBlock: its features would be ambiguous.
    with pytest.raises(GauntletError, match="more or less than once"):
        DeepKNN(net, x, y, layers=["layer1.0.relu"], calibration_size=4, k=2)


# ---------------------------------------------------------------- adaptive DkNN attack

ADAPTIVE_SPEC = {
    "dataset": "digits",
    "attack": "pgd",
    "params": {},
    "norm": "linf",
    "eps": 0.3,
    "n": 64,
    "seed": 0,
    "batch_size": 64,
    "defense": "dknn",
    "defense_params": {"index_size": 1000},
}


def test_feature_space_attack_lowers_dknn_robust_accuracy(stored):
    from gauntlet.workers.results import unpack
    from gauntlet.workers.task import run_spec

    model, store = stored
    runs = {
        adaptive: run_spec(
            {**ADAPTIVE_SPEC, "adaptive": adaptive}, model, artifacts=store, data_root=""
        )
        for adaptive in (False, True)
    }
    value = {a: {m.name: m.value for m in r.metrics} for a, r in runs.items()}
    print({a: (v["robust_accuracy"], v["rejected_adversarial"]) for a, v in value.items()})
    assert runs[False].details["adaptations"] == []
    assert runs[True].details["adaptations"] == ["dknn-feature-space"]
    # Same points, same clean answers (and the same rejections of clean inputs).
    assert runs[True].clean == runs[False].clean
    assert value[True]["rejected_clean"] == value[False]["rejected_clean"] < 0.15
    # Measured: plain PGD 0.83 (41% of its adversarial inputs rejected), adaptive 0.06.
    assert value[False]["robust_accuracy"] > 0.6
    assert value[True]["robust_accuracy"] <= value[False]["robust_accuracy"] - 0.4
    assert value[True]["rejected_adversarial"] < value[False]["rejected_adversarial"]
    # Per point (measured): the adaptive run, which runs the plain attack first, broke
    # every point the plain run broke.
    robust = {a: unpack(r.robust, 64) for a, r in runs.items()}
    assert not (robust[True] & ~robust[False]).any()
    assert runs[True].details["breakdown"]["dknn-feature-space"] > 0
    bits = runs[True].details["rejected"]
    assert unpack(bytes.fromhex(bits["adversarial"]), 64).mean() == pytest.approx(
        value[True]["rejected_adversarial"]
    )


def _board_run(engine, model_id, attack, robust, rejected_adv, adaptations, n=10):
    """A done DkNN job: clean wrong (rejected) at 9, ``robust`` and rejections as given."""
    from gauntlet.workers.results import pack
    from tests.test_leaderboard import evaluate

    clean = [i != 9 for i in range(n)]
    rejected = {
        "clean": pack([i == 9 for i in range(n)]).hex(),
        "adversarial": pack(rejected_adv).hex(),
    }
    evaluate(
        engine,
        model_id,
        attack,
        clean,
        robust,
        eps=0.3,
        defense="DkNN(k=75, calibration_size=750, index_size=10000, threshold=0.1, seed=0)",
        details={"adaptations": adaptations, "rejected": rejected},
    )


def test_board_credits_rejections_only_under_the_adaptive_attack(db_url):
    from gauntlet.db import open_database
    from gauntlet.scheduler.boards.leaderboard import leaderboard
    from gauntlet.scheduler.boards.rejecting import NO_ADAPTIVE
    from tests.service_helpers import add_model

    engine = open_database(db_url, auto_upgrade=True)
    model_id = "d" * 64
    add_model(engine, model_id, "dknn-net")
    none = [False] * 10
    _board_run(engine, model_id, "clean", [i != 9 for i in range(10)], none, [])
    # Plain PGD: one accepted wrong answer (0), three rejected inputs (1, 2, 3) stored as
    # robust by the job, clean point 9 rejected.
    plain_robust = [i not in (0, 9) for i in range(10)]
    _board_run(engine, model_id, "pgd", plain_robust, [i in (1, 2, 3) for i in range(10)], [])
    (entry,) = leaderboard(engine)
    # No adaptive result: rejections not credited, 10 - |{0, 1, 2, 3, 9}| = 5 robust.
    assert (entry.robust_accuracy, entry.robust_non_adaptive) == (0.5, 0.5)
    assert entry.rejecting and entry.rejected_clean == 0.1
    assert NO_ADAPTIVE in entry.unreliable

    # The feature-space attack gets 1 accepted; 2 and 3 stay rejected under it too.
    adaptive_robust = [i not in (1, 9) for i in range(10)]
    _board_run(
        engine,
        model_id,
        "pgd",
        adaptive_robust,
        [i in (2, 3) for i in range(10)],
        ["dknn-feature-space"],
    )
    (entry,) = leaderboard(engine)
    # Robust: survived both, rejections credited = not in {0, 1, 9}: 7 of 10. The
    # non-adaptive column still credits none of the plain attack's rejections.
    assert (entry.robust_accuracy, entry.robust_non_adaptive) == (0.7, 0.5)
    assert entry.unreliable == [] and entry.rejecting
    # Both boards say the entry may refuse to answer, with its clean rejection rate.
    from rich.console import Console

    from gauntlet.scheduler.cli.tables import leaderboard_tables
    from gauntlet.scheduler.web.boards import leaderboard_html

    console = Console(width=250, record=True)
    for table in leaderboard_tables([entry]):
        console.print(table)
    text = console.export_text()
    assert "dknn-net" in text and "[rejecting]" in text
    assert "70.0% (rejects 10.0% clean)" in text
    page = leaderboard_html([entry], {model_id: {"name": "dknn-net"}}, "rank", "asc", "/")
    assert '<span class="flag">rejecting defense</span>' in page
    engine.dispose()


def test_feature_space_attack_refuses_a_model_that_is_not_a_dknn(standard, test_points):
    x, y = test_points
    with pytest.raises(GauntletError, match="dknn"):
        build_attack("dknn-feature-space", {"steps": 2})(
            standard, x[:4], y[:4], Threat("linf", 0.1)
        )


# ---------------------------------------------------------------------------- quilting


def _fitted(**params) -> Quilting:
    defense = Quilting(**params)
    defense.fit(*load_split("digits", "train", None))
    return defense


def test_quilting_registered_repr_and_bad_params():
    assert DEFENSES["quilting"] is Quilting
    defense = build_defense("quilting", {"patch": 2}, None)
    assert not defense.differentiable and not defense.randomized and defense.needs_fit
    assert repr(defense) == "Quilting(patch=2, database_size=5000, seed=0)"
    assert repr(defense) == repr(build_defense("quilting", {"patch": 2}, None))
    for bad in (
        {"patch": 0},
        {"patch": 2.5},
        {"database_size": 0},
        {"seed": -1},
        {"radius": 1},
    ):
        with pytest.raises(GauntletError):
            build_defense("quilting", bad, None)
    with pytest.raises(GauntletError, match="no patch database"):
        Quilting().transform(torch.zeros(1, 1, 8, 8))
    with pytest.raises(GauntletError, match="larger"):
        _fitted(patch=9)


def test_database_is_deterministic_and_capped():
    x = load_split("digits", "train", None)[0][:300]  # a subset keeps torch.unique fast
    a = patch_database(x, 3, 500, seed=1)
    assert a.shape == (500, 9)
    assert torch.equal(a, patch_database(x, 3, 500, seed=1))
    assert not torch.equal(a, patch_database(x, 3, 500, seed=2))
    assert len(torch.unique(a, dim=0)) == 500
    assert _fitted(database_size=300).database_tensor().shape == (300, 9)


@pytest.mark.parametrize("patch", [2, 3, 4])
def test_quilted_images_consist_of_database_patches(test_points, patch):
    x, _ = test_points
    defense = _fitted(patch=patch, database_size=400)
    database = defense.database_tensor()
    out = defense.transform((x[:20] + 0.05 * torch.randn_like(x[:20])).clamp(0, 1))
    assert out.shape == x[:20].shape
    # With patch | 8 every grid tile is whole; with patch=3 the edge tiles at 5 are
    # written last and are whole (those at 3 are partly covered by them).
    starts = [0, 2, 4, 6] if patch == 2 else [0, 4] if patch == 4 else [0, 5]
    rows = torch.cat(
        [
            out[:, :, i : i + patch, j : j + patch].reshape(len(out), -1)
            for i in starts
            for j in starts
        ]
    )
    matches = (rows[:, None, :] == database[None]).all(-1).any(-1)
    assert matches.all()
    # The input itself is not made of database patches: the test can fail.
    noisy = torch.rand(5, 1, 8, 8)
    raw = noisy[:, :, :patch, :patch].reshape(5, -1)
    assert not (raw[:, None, :] == database[None]).all(-1).any(-1).any()


def test_quilting_keeps_clean_accuracy_and_passes_no_gradient(standard, test_points):
    x, y = test_points
    defense = build_defense("quilting", {}, standard)
    defense.fit(*load_split("digits", "train", None))
    clean = _accuracy(standard, x, y)
    quilted = _accuracy(defense, x, y)
    print(f"clean accuracy {clean:.3f}, with quilting {quilted:.3f}")
    assert quilted >= clean - 0.1

    xr = x[:8].clone().requires_grad_(True)
    defense(xr).sum().backward()
    assert torch.count_nonzero(xr.grad) == 0
    xr.grad = None
    defense.bpda_forward(xr).sum().backward()
    assert torch.count_nonzero(xr.grad) > 0

"""Ensemble adversarial training really crafts on its static models, and says so."""

from __future__ import annotations

import pytest
import torch

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.context import JobContext
from gauntlet.workers.jobs import train


@pytest.fixture
def static_row(stored, digits_models):
    model, store = stored
    sha = ArtifactStore(store).put_file(digits_models["robust"])
    return {**model, "id": "s" * 64, "name": "robust-static", "weights_sha256": sha}


def _train(stored, method: str, others: dict, **params):
    model, store = stored
    spec = {
        "dataset": "digits",
        "seed": 3,
        "n": 20,
        "attack": method,
        # The same seed, eps and epochs for every run: only the static models differ.
        "params": {"eps": 0.2, "epochs": 2, **params},
    }
    ctx = JobContext(spec, model, store, "", others=others, device_label="cpu")
    ctx.device = torch.device("cpu")
    return train.run(ctx).details


def test_ensemble_at_crafts_on_the_static_models(stored, static_row):
    static_id = static_row["id"]
    fgsm = _train(stored, "fgsm-at", {})
    again = _train(stored, "fgsm-at", {})
    # Same seed, same code path: bit-for-bit the same weights. So a run that dropped its
    # static models would reproduce FGSM-AT exactly, and the comparison below means something.
    assert again["derived_weights_sha256"] == fgsm["derived_weights_sha256"]

    ensemble = _train(stored, "ensemble-at", {static_id: static_row}, static_models=[static_id])
    assert ensemble["static_models"] == [static_id]
    assert ensemble["static_model_names"] == ["robust-static"]
    assert ensemble["derived_weights_sha256"] != fgsm["derived_weights_sha256"]
    # 1347 training points in batches of 64, two epochs: 44 batches, each crafted on the
    # model or the static one with equal chance (expected share 1/2).
    sources = ensemble["example_sources"]
    assert set(sources) == {"self", static_id}
    assert sum(sources.values()) == 44
    assert 0.25 < ensemble["static_batch_share"] < 0.75
    assert ensemble["static_batch_share"] == sources[static_id] / 44
    # Plain FGSM-AT records no static models and no sources.
    assert fgsm["static_models"] == [] and "example_sources" not in fgsm


def test_ensemble_at_refuses_to_train_without_its_static_models(stored, static_row):
    with pytest.raises(GauntletError, match="unknown"):
        _train(stored, "ensemble-at", {}, static_models=[static_row["id"]])

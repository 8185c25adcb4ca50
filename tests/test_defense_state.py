"""Fitted defenses in evaluation jobs: stored state (quilting, DkNN) and rejection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.workers import results
from gauntlet.workers.datasets import load_split
from gauntlet.workers.defenses.dknn import DkNN
from gauntlet.workers.defenses.quilting import Quilting, patch_database
from tests.service_helpers import metric, run_eval

N = 96


def _fgsm(stored, **spec):
    return run_eval(stored, n=N, attack="fgsm", params={}, **spec)


def test_quilting_database_is_stored_once_and_reused(stored, monkeypatch):
    _, store = stored
    first = _fgsm(stored, defense="quilting", defense_params={"database_size": 800})
    sha = first.details["defense_state"]
    database = load_file(str(ArtifactStore(store).get(sha)))["database"]
    x_train = load_split("digits", "train", None)[0]
    assert torch.equal(database, patch_database(x_train, 3, 800, 0))

    def refit(*_):
        raise AssertionError("the stored database should have been loaded")

    monkeypatch.setattr(Quilting, "fit", refit)
    again = _fgsm(stored, defense="quilting", defense_params={"database_size": 800})
    assert again.details["defense_state"] == sha
    assert (again.clean, again.robust) == (first.clean, first.robust)
    monkeypatch.undo()

    # A corrupt stored state is rebuilt, not trusted and not fatal.
    path = ArtifactStore(store).root / sha[:2] / sha
    path.write_bytes(b"not a safetensors file")
    rebuilt = _fgsm(stored, defense="quilting", defense_params={"database_size": 800})
    assert rebuilt.details["defense_state"] == sha
    assert ArtifactStore(store).get(sha)  # the hash checks out again
    # Another configuration is another state.
    other = _fgsm(stored, defense="quilting", defense_params={"database_size": 400})
    assert other.details["defense_state"] != sha


def test_dknn_rejects_adversarial_inputs_and_counts_them_as_defended(stored):
    bare = _fgsm(stored)
    # Non-adaptive: the plain FGSM the paper evaluates (adaptive runs add the feature-space
    # attack, which gets most inputs accepted; see test_dknn.py).
    defended = _fgsm(stored, defense="dknn", defense_params={"threshold": 0.1}, adaptive=False)
    rejected_clean = metric(defended, "rejected_clean")
    rejected_adv = metric(defended, "rejected_adversarial")
    names = ("clean_accuracy", "robust_accuracy", "rejected_clean", "rejected_adversarial")
    print({name: round(metric(defended, name), 3) for name in names})
    # Conformal p-values: the true label's is uniform on clean data, so a threshold of 0.1
    # rejects about 10% of clean inputs (at most, up to sampling noise).
    assert rejected_clean < 0.2
    assert rejected_adv > rejected_clean + 0.2
    assert metric(defended, "clean_accuracy") > metric(bare, "clean_accuracy") - 0.2
    assert metric(defended, "robust_accuracy") > metric(bare, "robust_accuracy") + 0.15
    clean = results.unpack(defended.clean, N)
    robust = results.unpack(defended.robust, N)
    assert not (robust & ~clean).any()


def test_dknn_state_depends_on_the_model(stored, digits_models, tmp_path):
    model, store = stored
    params = {"defense": "dknn", "defense_params": {"k": 25}}
    first = _fgsm(stored, **params)
    robust_sha = ArtifactStore(store).put_file(digits_models["robust"])
    other = _fgsm(({**model, "weights_sha256": robust_sha}, store), **params)
    assert first.details["defense_state"] != other.details["defense_state"]
    tensors = load_file(str(ArtifactStore(store).get(first.details["defense_state"])))
    # small-cnn: two pooled feature maps and the penultimate layer are indexed.
    assert sorted(k for k in tensors if k.startswith("features.")) == [
        "features.0",
        "features.1",
        "features.2",
    ]
    assert len(tensors["calibration"]) == len(load_split("digits", "train", None)[1]) // 3


def test_unfitted_dknn_says_so():
    with pytest.raises(GauntletError, match="not fitted"):
        DkNN(torch.nn.Linear(64, 10)).decide(torch.zeros(2, 64))

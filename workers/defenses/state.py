"""Fitted defense state (quilting's patch database, DkNN's index) as stored artifacts.

A defense that is built from training data is fitted once per (defense configuration,
dataset, and, where the state depends on them, model weights). The fitted tensors are
saved as safetensors in the content-addressed artifact store, and a small reference (a
named blob of the store, so it also works through Ray) named by that identity points at
them, so the next job with the same defense loads the state instead of refitting it,
and every job records which state it used.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.datasets import load_split
from gauntlet.workers.defenses.base import Defense

REFS = "defense-state"


def state_key(defense: Defense, *, dataset: str, model_sha: str | None) -> str:
    """What the fitted state depends on, hashed: configuration, data, and weights if used."""
    identity = {
        "defense": defense.name,
        "config": defense.config(),
        "dataset": dataset,
        "model": model_sha if defense.fit_uses_model else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _load(defense: Defense, store: ArtifactStore, ref: str) -> str | None:
    """The stored state's sha after loading it into ``defense``; None if unusable."""
    try:
        text = store.get_named(ref)
        if text is None:
            return None
        sha = text.decode("ascii", "replace").strip()
        defense.load_state_tensors(load_file(str(store.get(sha))))
    except (OSError, GauntletError, SafetensorError):
        # A missing, corrupt or mismatched state is rebuilt, not trusted.
        return None
    return sha


def prepare_defense(
    defense: Defense, *, dataset: str, model_sha: str | None, artifacts, data_root: str | None
) -> str | None:
    """Fit ``defense`` (or load its stored fit); returns the state's artifact sha.

    ``artifacts``: a store, its root path, or a ``ray-artifacts://`` address.
    """
    if not defense.needs_fit:
        return None
    from gauntlet.workers.remote_store import open_store

    store = open_store(artifacts)
    ref = f"{REFS}/{state_key(defense, dataset=dataset, model_sha=model_sha)}"
    sha = _load(defense, store, ref)
    if sha is not None:
        return sha
    x, y = load_split(dataset, "train", data_root)
    with torch.no_grad():
        defense.fit(x, y)
    tensors = {k: v.detach().cpu().contiguous() for k, v in defense.state_tensors().items()}
    sha = store.put_bytes(save_tensors(tensors))
    # Replaced atomically: a concurrent job reads the old reference or the new one.
    store.put_named(ref, sha.encode())
    return sha

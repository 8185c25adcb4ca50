"""Per-example progress of a job, saved as it goes, so a lost worker's job resumes.

The evaluation subset is processed in chunks; after each chunk the outcomes so far are
written (atomically, as safetensors: data, never pickle) as a named blob of the
artifact store: a file under its root, or, for workers without a shared filesystem, in
the scheduler's store through Ray, so an attempt on another node finds it. A
new attempt of the same job loads them and starts at the first unfinished chunk. Each
chunk draws its randomness from (seed, chunk index), so a resumed job computes exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save


class Checkpoint:
    def __init__(self, artifacts, name: str):
        from gauntlet.workers.remote_store import open_store

        # ``artifacts``: a store, its root path, or a ``ray-artifacts://`` address.
        self.store = open_store(artifacts)
        self.name = f"checkpoints/{name}.safetensors"

    def load(self) -> dict[str, torch.Tensor] | None:
        try:
            data = self.store.get_named(self.name)
            return None if data is None else load(data)
        except (SafetensorError, OSError):
            return None  # a torn or unreadable file: start over rather than fail

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        self.store.put_named(self.name, data)

    def clear(self) -> None:
        self.store.delete_named(self.name)

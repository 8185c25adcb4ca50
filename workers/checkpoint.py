"""Per-example progress of a job, saved as it goes, so a lost worker's job resumes.

The evaluation subset is processed in chunks; after each chunk the outcomes so far are
written (atomically, as safetensors: data, never pickle) under the artifact root. A
new attempt of the same job loads them and starts at the first unfinished chunk. Each
chunk draws its randomness from (seed, chunk index), so a resumed job computes exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class Checkpoint:
    def __init__(self, root: str | os.PathLike, name: str):
        self.path = Path(root) / "checkpoints" / f"{name}.safetensors"

    def load(self) -> dict[str, torch.Tensor] | None:
        if not self.path.exists():
            return None
        try:
            return load_file(str(self.path))
        except (SafetensorError, OSError):
            return None  # a torn or unreadable file: start over rather than fail

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".partial-")
        os.close(fd)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

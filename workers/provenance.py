"""Where and how a job's result was made: its provenance record.

The task entry attaches one to every result (``details["provenance"]``), whatever the
kind, so a number on a board can be traced to the code, the library versions, the
device, the seed and the batch size that produced it. For an eval job the record also
holds the sha256 of its adversarial examples, serialised as safetensors: ``gauntlet
verify`` reruns the job and compares that hash and the per-example outcomes.

Nothing here may fail a job: a version that cannot be read is recorded as None.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import time
from pathlib import Path

import torch

from gauntlet.workers.context import JobContext, code_version
from gauntlet.workers.results import JobResult

# The tensor's name inside the stored safetensors file.
ADVERSARIAL_KEY = "x_adv"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the package runs from; None for an installed copy.

    Only a package that sits in a git checkout asks git: an installed wheel has no
    history to name, and a commit read from some unrelated repository would mislead.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _device_versions(device: torch.device) -> dict:
    """CUDA and cuDNN versions and the device's model; the versions are None on CPU."""
    if device.type == "cuda":
        try:
            name = torch.cuda.get_device_name(device)
        except Exception:  # noqa: BLE001 - a label must never fail the job
            name = "cuda"
        return {
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "device_model": name,
        }
    return {"cuda": None, "cudnn": None, "device_model": platform.processor() or "cpu"}


def adversarial_bytes(x_adv: torch.Tensor) -> bytes:
    """The adversarial examples as a safetensors file: the bytes that are hashed and kept.

    safetensors writes a tensor's raw bytes after a header that depends only on its
    name, dtype and shape, so equal tensors give equal bytes, and an equal hash.
    """
    from safetensors.torch import save

    return save({ADVERSARIAL_KEY: x_adv.detach().cpu().contiguous()})


def collect(ctx: JobContext, *, wall_seconds: float) -> dict:
    """The provenance record of a job that ran over ``ctx``."""
    seed = ctx.spec.get("seed")
    return {
        "gauntlet": code_version(),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        **_device_versions(ctx.device),
        "device": str(ctx.device),
        "seed": None if seed is None else int(seed),
        "batch_size": ctx.batch_size,
        "wall_seconds": round(wall_seconds, 3),
    }


def attach(ctx: JobContext, result: JobResult, *, keep_adversarial: bool = True) -> JobResult:
    """Add the provenance record to ``result``'s details (and keep its adversarial examples).

    The hash is recorded even when the examples are not kept, so a rerun can still be
    compared; keeping them costs a copy of the evaluation subset per job.
    """
    record = collect(ctx, wall_seconds=time.perf_counter() - ctx.started)
    if ctx.adversarial is not None:
        data = adversarial_bytes(ctx.adversarial)
        if keep_adversarial:
            record["adversarial_sha256"] = ctx.store.put_bytes(data)
        else:
            record["adversarial_sha256"] = hashlib.sha256(data).hexdigest()
        record["adversarial_kept"] = keep_adversarial
    result.details = {**(result.details or {}), "provenance": record}
    return result

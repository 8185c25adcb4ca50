"""Making evaluations fast on a GPU without changing their numbers beyond a stated tolerance.

On CUDA devices a job's network is put in channels-last memory format (the layout the
tensor cores' convolution kernels want), cuDNN picks its fastest algorithms for the
shapes it sees (``benchmark``), and float32 matrix products and convolutions may use
TF32. TF32 rounds the inputs of each product to a 10-bit mantissa, which moves logits by
about 1e-3 relative: a point on a decision boundary may flip. The tolerance gauntlet
states for it is the one ``gauntlet verify`` uses on GPUs, at most 0.5% of points;
``bench/gpu.py`` measures it as the robust-accuracy difference between this mode and
plain float32 (TF32 off, contiguous layout) on the same points.
``GAUNTLET_GPU_EXACT=1`` turns all of it off for a job that must match float32 bit for
bit.

The batch size grows to fill the GPU: the spec's ``batch_size`` is a floor (and the
size on CPUs), and on CUDA the job measures one forward and backward pass of a probe
batch and takes the largest batch that fits in a fraction of the free memory.
"""

from __future__ import annotations

import os

import torch

# Share of the free memory one job's batches may take: the rest is headroom for the
# attack's own tensors (iterates, momentum, best-so-far copies) and the allocator.
MEMORY_FRACTION = 0.6
PROBE = 8
MULTIPLE = 32
MAX_BATCH = 8192


def seed_everything(seed: int) -> None:
    """``torch.manual_seed`` without its cost on a machine that never touches CUDA.

    ``torch.manual_seed`` also queues a CUDA seeding call, with a captured stack trace,
    whenever CUDA is available but not initialised yet; queued calls pile up, one per
    call, and cost a millisecond or more each. Here CUDA is seeded only once it is in use,
    which is when its generators exist to be seeded.
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def exact_mode() -> bool:
    return os.environ.get("GAUNTLET_GPU_EXACT", "").strip().lower() in ("1", "true", "yes", "on")


def configure(device: torch.device) -> None:
    """Set the process-wide kernel choices for ``device`` (a no-op on CPUs)."""
    if device.type != "cuda":
        return
    fast = not exact_mode()
    torch.backends.cudnn.benchmark = fast
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast


def prepare_model(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The network in the layout the device's fastest kernels want."""
    configure(device)
    if device.type == "cuda" and not exact_mode():
        return net.to(memory_format=torch.channels_last)
    return net


def batch_for_memory(
    per_example_bytes: int, free_bytes: int, *, floor: int, cap: int = MAX_BATCH
) -> int:
    """The largest multiple of MULTIPLE examples fitting MEMORY_FRACTION of ``free_bytes``.

    Never below ``floor`` (the spec's own size), never above ``cap`` (the points there are).
    """
    if per_example_bytes <= 0:
        return max(floor, min(cap, MAX_BATCH))
    fits = int(free_bytes * MEMORY_FRACTION) // per_example_bytes
    fits = (fits // MULTIPLE) * MULTIPLE
    return max(floor, min(fits, cap, MAX_BATCH))


def per_example_bytes(model: torch.nn.Module, shape: tuple, device: torch.device) -> int:
    """Peak memory of one forward and backward pass, per example, on a probe batch."""
    x = torch.rand((PROBE, *shape), device=device, requires_grad=True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model(x).logsumexp(1).sum().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    model.zero_grad(set_to_none=True)
    return max(peak // PROBE, 1)


def auto_batch_size(
    model: torch.nn.Module,
    shape: tuple,
    device: torch.device,
    *,
    floor: int,
    cap: int,
    copies: int = 1,
) -> int:
    """On CUDA, the batch that fills the GPU; elsewhere ``floor``, the spec's size.

    ``copies``: forward passes an attack keeps in one graph per example (EOT's samples).
    """
    if device.type != "cuda":
        return floor
    free, _ = torch.cuda.mem_get_info(device)
    per_example = per_example_bytes(model, shape, device) * max(copies, 1)
    return batch_for_memory(per_example, free, floor=floor, cap=cap)

"""Batched inference: one loop for every job that runs a model over many images.

Evaluation sets are larger than one forward pass can hold, so jobs run the model over
slices of ``batch_size`` and concatenate what comes back. Doing it in one place keeps
the details the same everywhere: no autograd graph is built, each slice goes to the
device the model's weights are on, and a caller can shrink each slice's output (to
labels, or onto the CPU) before the next one runs, so only the small results pile up.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer; None if it holds no tensors.

    None rather than a guess: a model without tensors computes wherever its input is.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore the mode it was in.

    For callers that are handed a model mid-training (backdoor metrics between epochs):
    dropout and batch-norm statistics must not change the answer, nor the training run.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_in_batches(
    model: nn.Module | Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    batch_size: int,
    *,
    output: Callable[[Any], Any] | None = None,
) -> Any:
    """``model`` applied to ``x`` in slices of ``batch_size``, the outputs concatenated.

    ``model`` is a module (each slice is moved to its device first) or any callable on a
    batch, such as a defense's ``decide`` (given the slice as it is). ``output``, if
    given, maps each slice's output before it is kept (``lambda out: out.argmax(1)``).
    A tuple output is concatenated element-wise and comes back as a tuple. ``x`` must
    hold at least one image: the shape of an empty answer is unknowable here.
    """
    device = model_device(model) if isinstance(model, nn.Module) else None
    parts = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        out = model(batch if device is None else batch.to(device))
        parts.append(out if output is None else output(out))
    if parts and isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))
    return torch.cat(parts)


__all__ = ["eval_mode", "model_device", "predict_in_batches"]

"""Training a classifier on a registered dataset (the demo's models; train jobs later).

Adversarial training uses FGSM from a random start inside the ball (Wong et al. 2020,
"Fast is better than free"): the random start is what keeps single-step training from
collapsing into gradient masking, which plain FGSM training is known to do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gauntlet.workers.architectures import build_architecture
from gauntlet.workers.models import InputSpec, Normalized


def fgsm_random_start(model, x, y, eps: float, generator: torch.Generator) -> torch.Tensor:
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    delta.requires_grad_(True)
    loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def train_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    arch: str,
    spec: InputSpec,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    adversarial_eps: float = 0.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.nn.Module:
    """Train ``arch`` on (x, y) with Adam; adversarially when ``adversarial_eps > 0``.

    Returns the bare network (no normalisation wrapper), ready for ``save_classifier``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = build_architecture(arch, spec)
    model = Normalized(net, spec)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            if adversarial_eps > 0:
                model.eval()  # craft against inference-mode statistics
                xb = fgsm_random_start(model, xb, yb, adversarial_eps, generator)
                model.train()
            loss = F.cross_entropy(model(xb), yb)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if progress:
            progress(epoch + 1, epochs)
    net.eval()
    return net

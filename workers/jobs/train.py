"""The ``train`` job kind, training-time defenses: a submitted model in, a derived model out.

Methods (``spec["attack"]`` of a ``train`` job names the method, ``params`` its settings):

- ``fgsm-at``: FGSM adversarial training from a random start (Wong et al. 2020);
- ``pgd-at``: PGD adversarial training (Madry et al. 2018), ``pgd_steps`` steps;
- ``ensemble-at``: ensemble adversarial training (Tramer et al. 2018): each batch's
  adversarial examples come from the model itself or from one of the static,
  pre-trained models named in ``static_models``, chosen at random;
- ``distillation``: defensive distillation (Papernot et al. 2016): the parent, at
  temperature T, labels the training set with soft labels; a fresh network of the same
  architecture learns them at T and is deployed at T = 1.

The derived weights go to the artifact store; the scheduler registers them as a new
model whose parent is the submitted one, and evaluates it like any submission.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.architectures import build_architecture
from gauntlet.workers.attacks.base import expect_float, expect_int
from gauntlet.workers.context import JobContext
from gauntlet.workers.jobs import JobKind, register_kind
from gauntlet.workers.jobs.calibration import logits_of
from gauntlet.workers.models import InputSpec, Normalized, save_classifier
from gauntlet.workers.result import JobResult, Metric
from gauntlet.workers.training import fgsm_random_start

METHODS = ("fgsm-at", "pgd-at", "ensemble-at", "distillation")
_PARAMS = {
    "epochs",
    "eps",
    "lr",
    "pgd_steps",
    "temperature",
    "batch_size",
    "suite",
    "static_models",
}


def check_train(method: str, params: dict) -> dict:
    """Validated settings with defaults; GauntletError on anything unknown or out of range."""
    if method not in METHODS:
        raise GauntletError(f"Unknown training method {method!r}; known: {', '.join(METHODS)}")
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        raise GauntletError(
            f"Unknown training parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(_PARAMS))}"
        )
    static = params.get("static_models", [])
    if method == "ensemble-at" and (not isinstance(static, list) or not static):
        raise GauntletError("ensemble-at needs `static_models`: ids of pre-trained models")
    return {
        "static_models": sorted(static) if method == "ensemble-at" else [],
        "epochs": expect_int("epochs", params.get("epochs", 10), 1, 1000),
        "eps": expect_float("eps", params.get("eps", 0.1), 0.0, 1.0),
        "lr": expect_float("lr", params.get("lr", 1e-3), 0.0, 1.0),
        "pgd_steps": expect_int("pgd_steps", params.get("pgd_steps", 5), 1, 100),
        "temperature": expect_float("temperature", params.get("temperature", 100.0), 0.0, 1e4),
        "batch_size": expect_int("batch_size", params.get("batch_size", 64), 1, 100_000),
    }


def _pgd(model, x, y, eps: float, steps: int, generator) -> torch.Tensor:
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    step = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def _fit(model, x, y, settings, generator, batch_loss, progress=None) -> float:
    """Adam over shuffled mini-batches; ``batch_loss(model, idx, xb, yb)`` gives the loss.

    ``progress(epoch, epochs)`` after each epoch: a train job's progress in Redis.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    loss = torch.tensor(0.0)
    for epoch in range(settings["epochs"]):
        order = torch.randperm(len(x), generator=generator, device=x.device)
        for start in range(0, len(x), settings["batch_size"]):
            idx = order[start : start + settings["batch_size"]]
            model.train()
            loss = batch_loss(model, idx, x[idx], y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if progress:
            progress(epoch + 1, settings["epochs"])
    model.eval()
    return float(loss.detach())


def train_derived(
    method: str,
    params: dict,
    parent: torch.nn.Module,
    arch: str,
    spec: InputSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    static: list[torch.nn.Module] | None = None,
    progress=None,
):
    """The derived network (bare, no normalisation wrapper) and its final training loss."""
    settings = check_train(method, params)
    torch.manual_seed(seed)
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def fresh() -> Normalized:
        return Normalized(build_architecture(arch, spec), spec).to(x.device)

    if method == "distillation":
        # Papernot et al. 2016: a teacher trained at temperature T on the labels, then a
        # student trained at T on the teacher's soft labels, deployed at T = 1. Both learn
        # logits about T times larger than usual, which saturates the deployed softmax.
        temperature = settings["temperature"]
        teacher = fresh()
        _fit(
            teacher,
            x,
            y,
            settings,
            generator,
            lambda m, idx, xb, yb: F.cross_entropy(m(xb) / temperature, yb),
        )
        with torch.no_grad():
            soft = torch.cat(
                [
                    F.softmax(teacher(x[i : i + 512]) / temperature, dim=1)
                    for i in range(0, len(x), 512)
                ]
            )
        student = fresh()
        loss = _fit(
            student,
            x,
            y,
            settings,
            generator,
            lambda m, idx, xb, yb: (
                -(soft[idx] * F.log_softmax(m(xb) / temperature, dim=1)).sum(1).mean()
            ),
            progress,
        )
        return student.net, loss

    model = fresh()
    model.net.load_state_dict(parent.net.state_dict())  # adversarial fine-tuning of the parent

    def adversarial(m, idx, xb, yb):
        m.eval()  # craft against inference-mode statistics
        if method == "ensemble-at":
            # Tramer et al.: decoupling the examples from the model being trained is what
            # stops single-step training from learning to mask its own gradients.
            sources = [m, *(static or [])]
            pick = torch.randint(len(sources), (1,), generator=generator, device=xb.device)
            xb = fgsm_random_start(sources[int(pick)], xb, yb, settings["eps"], generator)
        elif method == "fgsm-at":
            xb = fgsm_random_start(m, xb, yb, settings["eps"], generator)
        else:
            xb = _pgd(m, xb, yb, settings["eps"], settings["pgd_steps"], generator)
        m.train()
        return F.cross_entropy(m(xb), yb)

    return model.net, _fit(model, x, y, settings, generator, adversarial, progress)


def run(ctx: JobContext) -> JobResult:
    settings = check_train(ctx.spec["attack"], ctx.params)
    static = ctx.other_models(settings["static_models"], "static model")
    x, y = ctx.train_split()
    net, loss = train_derived(
        ctx.spec["attack"],
        ctx.params,
        ctx.net,
        ctx.model["arch"],
        ctx.input_spec,
        x,
        y,
        ctx.seed,
        static=static,
        progress=ctx.progress,
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "derived.safetensors"
        save_classifier(net.cpu(), path)
        sha = ctx.store.put_file(path)
    details = {
        "derived_weights_sha256": sha,
        "method": ctx.spec["attack"],
        "settings": settings,
        # Recorded so that a reader can check which static models the examples came from.
        "static_models": settings["static_models"],
    }
    # The parent's clean outcomes on the evaluation subset.
    x_eval, y_eval, _ = ctx.eval_data
    clean = logits_of(ctx.net, x_eval, ctx.batch_size).argmax(1) == y_eval
    return ctx.result([Metric("final_train_loss", loss, len(y))], clean, clean, details)


def _static_models(spec: dict) -> list[str]:
    static = (spec.get("params") or {}).get("static_models") or []
    return list(static) if isinstance(static, list) else []


register_kind(
    JobKind("train", run, board="derived models", check=check_train, models=_static_models)
)

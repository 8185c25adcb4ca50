"""The ``train`` job kind, training-time defenses: a submitted model in, a derived model out.

Methods (``spec["attack"]`` of a ``train`` job names the method, ``params`` its settings):

- ``fgsm-at``: FGSM adversarial training from a random start (Wong et al. 2020);
- ``pgd-at``: PGD adversarial training (Madry et al. 2018), ``pgd_steps`` steps;
- ``ensemble-at``: ensemble adversarial training (Tramer et al. 2018): each batch's
  adversarial examples come from the model itself or from one of the static,
  pre-trained models named in ``static_models``, chosen at random;
- ``distillation``: defensive distillation (Papernot et al. 2016): the parent, at
  temperature T, labels the training set with soft labels; a fresh network of the same
  architecture learns them at T and is deployed at T = 1;
- ``prn``: no derived model: the Perturbation Rectifying Network defense (Akhtar et al.
  2018) is fitted for the submitted model and stored where ``defense: prn`` evaluations
  with the same settings find it (``workers.defenses.prn_training``).

The derived weights go to the artifact store; the scheduler registers them as a new
model whose parent is the submitted one, and evaluates it like any submission.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.attacks.pgd import PGD
from gauntlet.workers.batches import predict_in_batches
from gauntlet.workers.context import JobContext
from gauntlet.workers.defenses.prn_training import check_prn, run_prn
from gauntlet.workers.hyperparams import expect_float, expect_int
from gauntlet.workers.jobs import HOUR, JobKind, check_procedure, register_kind
from gauntlet.workers.models import InputSpec, save_classifier
from gauntlet.workers.results import JobResult, Metric
from gauntlet.workers.training import (
    FGSM_RANDOM_START,
    adversarial,
    distillation_loss,
    fit,
    fresh_model,
    soft_labels,
)

METHODS = ("fgsm-at", "pgd-at", "ensemble-at", "distillation", "prn")
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
    if method == "prn":  # its settings are the prn defense's hyperparameters
        return check_prn(params)
    check_procedure(
        method,
        METHODS,
        params,
        _PARAMS,
        what="training method",
        params_what="training parameter(s)",
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
    counts: list[int] | None = None,
):
    """The derived network (bare, no normalisation wrapper) and its final training loss.

    ``progress(epoch, epochs)`` after each epoch: a train job's progress in Redis.
    ``counts``, when given, is filled with the number of batches whose examples were
    crafted on each source (the model, then each static model; ensemble-at only).
    """
    if method == "prn":
        raise GauntletError("prn fits a defense, not a derived network: run it as a train job")
    settings = check_train(method, params)
    torch.manual_seed(seed)
    # One generator, on the data's device, for shuffles, random starts and picks alike.
    generator = torch.Generator(device=x.device).manual_seed(seed)
    schedule = dict(
        epochs=settings["epochs"],
        lr=settings["lr"],
        batch_size=settings["batch_size"],
        generator=generator,
    )

    if method == "distillation":
        # Papernot et al. 2016: a teacher trained at temperature T on the labels, then a
        # student trained at T on the teacher's soft labels, deployed at T = 1. Both learn
        # logits about T times larger than usual, which saturates the deployed softmax.
        temperature = settings["temperature"]
        # Initialised from the one seeded stream: the student's init follows the teacher's.
        teacher = fresh_model(arch, spec, None, x.device)
        fit(
            teacher,
            x,
            y,
            loss=lambda logits, yb: F.cross_entropy(logits / temperature, yb),
            **schedule,
        )
        soft = soft_labels(teacher, x, temperature, batch_size=512)
        student = fresh_model(arch, spec, None, x.device)
        # The soft labels stand in for y: fit shuffles and batches them alongside x.
        loss = fit(
            student,
            x,
            soft,
            loss=lambda logits, probs: distillation_loss(logits, probs, temperature),
            progress=progress,
            **schedule,
        )
        return student.net, loss

    model = fresh_model(arch, spec, None, x.device)
    model.net.load_state_dict(parent.net.state_dict())  # adversarial fine-tuning of the parent
    if method == "pgd-at":
        attack = PGD(norm="linf", steps=settings["pgd_steps"])  # Madry et al.: 2.5 eps / steps
    else:
        attack = FGSM_RANDOM_START
    # ensemble-at draws its examples from the model or the static ones (Tramer et al.).
    static = (static or []) if method == "ensemble-at" else []
    if method == "ensemble-at" and len(static) != len(settings["static_models"]):
        # Training without them would be FGSM-AT under another name.
        raise GauntletError(
            f"ensemble-at names {len(settings['static_models'])} static model(s) "
            f"but {len(static)} were loaded"
        )
    if counts is not None:
        counts[:] = [0] * (len(static) + 1)
    perturb = adversarial(attack, settings["eps"], generator, static, counts)
    return model.net, fit(model, x, y, perturb=perturb, progress=progress, **schedule)


def run(ctx: JobContext) -> JobResult:
    if ctx.spec["attack"] == "prn":
        return run_prn(ctx)
    settings = check_train(ctx.spec["attack"], ctx.params)
    static = ctx.other_models(settings["static_models"], "static model")
    x, y = ctx.train_split()
    counts: list[int] = []
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
        counts=counts,
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
        "static_model_names": [ctx.others[i].get("name") for i in settings["static_models"]],
    }
    if settings["static_models"]:
        # Evidence that they were used: the batches crafted on each source, and the share
        # crafted on a static model (about static / (static + 1) when picks are uniform).
        sources = ["self", *settings["static_models"]]
        details["example_sources"] = dict(zip(sources, counts, strict=True))
        details["static_batch_share"] = sum(counts[1:]) / max(sum(counts), 1)
    # The parent's clean outcomes on the evaluation subset.
    x_eval, y_eval, _ = ctx.eval_data
    clean = predict_in_batches(ctx.net, x_eval, ctx.batch_size).argmax(1) == y_eval
    return ctx.result([Metric("final_train_loss", loss, len(y))], clean, clean, details)


def _static_models(spec: dict) -> list[str]:
    static = (spec.get("params") or {}).get("static_models") or []
    return list(static) if isinstance(static, list) else []


# Epochs over the whole training split (adversarial training attacks every batch).
register_kind(
    JobKind(
        "train",
        run,
        board="derived models",
        check=check_train,
        models=_static_models,
        time_limit_s=12 * HOUR,
    )
)

"""One evaluation job, start to finish, inside a worker: load, attack, measure.

Everything arrives as plain data (the job spec and the model rows); the result goes
back as a ``JobResult``. Problems the submitter can fix (a corrupt file, weights that
do not fit the architecture, a model whose input does not match the dataset) raise
``GauntletError`` and become a permanent failure of this one job.

The attack runs on the *attack surface*: the model, or for a defended model its
adaptive stand-in (BPDA, EOT). Whether a point is robust is always judged on the
defended model itself. For a transfer job the surface is the source (surrogate) model.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from importlib import metadata

import torch

from gauntlet.cluster.artifacts import ArtifactStore
from gauntlet.cluster.errors import GauntletError
from gauntlet.workers import outcomes, reliability
from gauntlet.workers.adaptive import attack_surface
from gauntlet.workers.attacks import AttackResult, Threat, build_attack
from gauntlet.workers.backdoor_job import backdoor_job
from gauntlet.workers.calibrate import calibration_job, logits_of
from gauntlet.workers.checkpoint import Checkpoint
from gauntlet.workers.corruptions import corruption_metrics
from gauntlet.workers.datasets import dataset_info, eval_subset, load_split
from gauntlet.workers.defense_state import prepare_defense
from gauntlet.workers.defenses import Defense, build_defense
from gauntlet.workers.metrics import attack_metrics
from gauntlet.workers.models import InputSpec, load_classifier
from gauntlet.workers.pate_job import pate_job
from gauntlet.workers.result import JobResult, Metric
from gauntlet.workers.train_job import train_job

# Points used for the reliability checks: enough to see masking, cheap to run.
CHECK_POINTS = 64


def code_version() -> str:
    try:
        return metadata.version("gauntlet-eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def pick_device() -> torch.device:
    # Under Ray, CUDA_VISIBLE_DEVICES already narrows this to the GPUs the task was given.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_input_matches(spec: InputSpec, dataset: str) -> None:
    info = dataset_info(dataset)
    model_shape = (spec.channels, spec.height, spec.width)
    data_shape = (info.channels, info.height, info.width)
    if model_shape != data_shape:
        raise GauntletError(
            f"shape mismatch: the model takes inputs of shape {model_shape} but {dataset!r} "
            f"images have shape {data_shape}; submit with a matching input spec"
        )
    if spec.num_classes != info.num_classes:
        raise GauntletError(
            f"shape mismatch: the model has {spec.num_classes} classes but {dataset!r} has "
            f"{info.num_classes}"
        )


def load_model(model: dict, dataset: str, artifacts: str, device) -> torch.nn.Module:
    input_spec = InputSpec.from_dict(model["input_spec"])
    check_input_matches(input_spec, dataset)
    weights = ArtifactStore(artifacts).get(model["weights_sha256"])
    return load_classifier(weights, model["arch"], input_spec, device=device)


class SurrogateEnsemble(torch.nn.Module):
    """Several surrogates as one model: their mean logits (Liu et al. 2017)."""

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(models)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def decide(defended, x, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, accepted) of the deployed model; only rejecting defenses refuse."""
    preds, accepted = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            if isinstance(defended, Defense):
                pred, ok = defended.decide(xb)
            else:
                pred = defended(xb).argmax(1)
                ok = torch.ones_like(pred, dtype=torch.bool)
            preds.append(pred)
            accepted.append(ok)
    return torch.cat(preds), torch.cat(accepted)


def _judge(defended, x, x_adv, y, batch_size: int):
    """(clean correct, robust, rejected) on the deployed model, whatever the attack ran on.

    A rejected clean input is not a correct answer; a rejected adversarial input is a
    defended one (the attack did not get a wrong label through). ``rejected`` is (n, 2):
    the clean input, the adversarial one.
    """
    pred, accepted = decide(defended, x, batch_size)
    pred_adv, accepted_adv = decide(defended, x_adv, batch_size)
    clean = (pred == y) & accepted
    rejected = torch.stack([~accepted, ~accepted_adv], dim=1)
    return clean, clean & ((pred_adv == y) | ~accepted_adv), rejected


def rejection_metrics(rejected: torch.Tensor) -> list[Metric]:
    """Shares of clean and of adversarial inputs the defense refused to answer."""
    metrics = []
    for column, name in enumerate(("rejected_clean", "rejected_adversarial")):
        k, n = int(rejected[:, column].sum()), len(rejected)
        low, high = outcomes.wilson_interval(k, n)
        metrics.append(Metric(name, k / n, n, low, high))
    return metrics


def run_chunks(
    attack, surface, defended, x, y, threat, *, seed, batch_size, checkpoint, progress
) -> tuple[AttackResult, torch.Tensor]:
    """The attack's result, and which clean and adversarial inputs were rejected (n, 2)."""
    """Attack in chunks of ``batch_size``, saving per-example state after each chunk."""
    n = len(x)
    state = checkpoint.load() if checkpoint else None
    stale = state is None or "rejected" not in state or state["x_adv"].shape != x.shape
    if stale or int(state["done"]) > n:
        state = {
            "done": torch.tensor(0),
            "x_adv": x.detach().cpu().clone(),
            "clean": torch.zeros(n, dtype=torch.bool),
            "robust": torch.zeros(n, dtype=torch.bool),
            "rejected": torch.zeros(n, 2, dtype=torch.bool),
            "queries": torch.zeros(n, dtype=torch.int64),
            "grad_evals": torch.tensor(0),
        }
    black_box = False
    for start in range(int(state["done"]), n, batch_size):
        sl = slice(start, start + batch_size)
        generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + start)
        torch.manual_seed(seed * 1_000_003 + start)  # randomized defenses draw from here
        part = attack(surface, x[sl], y[sl], threat, batch_size=batch_size, generator=generator)
        clean, robust = part.clean_correct, part.robust
        if (
            defended is not surface
            or getattr(defended, "randomized", False)
            or getattr(defended, "rejects", False)
        ):
            # Judge on the deployed model with fresh randomness: an attack on a random
            # model stops at the first lucky draw, which says little about the next one.
            clean, robust, rejected = _judge(defended, x[sl], part.x_adv, y[sl], batch_size)
            state["rejected"][sl] = rejected.cpu()
        state["x_adv"][sl] = part.x_adv.detach().cpu()
        state["clean"][sl], state["robust"][sl] = clean.cpu(), robust.cpu()
        if part.queries is not None:
            black_box = True
            state["queries"][sl] = part.queries.cpu()
        state["grad_evals"] = state["grad_evals"] + part.grad_evals
        state["done"] = torch.tensor(min(start + batch_size, n))
        if checkpoint:
            checkpoint.save(state)
        if progress:
            progress(int(state["done"]), n)
    return AttackResult(
        x_adv=state["x_adv"].to(x.device),
        clean_correct=state["clean"],
        robust=state["robust"],
        grad_evals=int(state["grad_evals"]),
        queries=state["queries"] if black_box or attack.black_box else None,
    ), state["rejected"]


def evaluate(
    spec: dict,
    model: dict,
    *,
    artifacts: str,
    data_root: str,
    progress: Callable[[int, int], None] | None = None,
    device_label: str | None = None,
    source_model: dict | None = None,
    source_models: list[dict] | None = None,
    checkpoint_name: str | None = None,
) -> JobResult:
    start = time.perf_counter()
    device = pick_device()

    def finish(metrics, clean, robust, details, subtasks=()) -> JobResult:
        """The job's result: per-example outcomes packed, where and how it ran."""
        return JobResult(
            metrics=metrics,
            n=len(clean),
            clean=outcomes.pack(clean),
            robust=outcomes.pack(robust),
            worker_host=socket.gethostname(),
            device=device_label or str(device),
            code_version=code_version(),
            seconds=time.perf_counter() - start,
            # Which fitted defense state (an artifact) the job used, if any.
            details={**details, "defense_state": defense_state} if defense_state else details,
            subtasks=list(subtasks),
        )

    net = load_model(model, spec["dataset"], artifacts, device)
    defended = net
    defense_state = None
    if spec.get("defense"):
        defended = build_defense(spec["defense"], spec.get("defense_params"), net).eval()
        defense_state = prepare_defense(
            defended,
            dataset=spec["dataset"],
            model_sha=model.get("weights_sha256"),
            artifacts=artifacts,
            data_root=data_root,
        )
    surface, adaptations = attack_surface(
        defended, adaptive=spec.get("adaptive", True), eot_samples=spec.get("eot_samples", 10)
    )
    if spec.get("source_model"):
        if source_model is None:
            raise GauntletError(f"transfer source model {spec['source_model'][:12]} is unknown")
        surface = load_model(source_model, spec["dataset"], artifacts, device)
        adaptations = [*adaptations, "transfer"]
    if spec.get("source_ensemble"):
        if not source_models or len(source_models) != len(spec["source_ensemble"]):
            raise GauntletError("a surrogate model of this transfer ensemble is unknown")
        surface = SurrogateEnsemble(
            [load_model(m, spec["dataset"], artifacts, device) for m in source_models]
        )
        adaptations = [*adaptations, f"transfer-ensemble-{len(source_models)}"]

    x, y, indices = eval_subset(spec["dataset"], spec["n"], spec["seed"], data_root)
    x, y = x.to(device), y.to(device)
    seed = int(spec["seed"])
    torch.manual_seed(seed)
    if spec.get("kind") == "train":
        static = [load_model(m, spec["dataset"], artifacts, device) for m in source_models or []]
        metrics, details = train_job(
            spec,
            net,
            model,
            artifacts=artifacts,
            data_root=data_root,
            device=device,
            static=static,
            progress=progress,
        )
        clean = logits_of(net, x, int(spec.get("batch_size", 256))).argmax(1) == y
        return finish(metrics, clean, clean, details)
    if spec.get("kind") == "backdoor":
        metrics, details, clean, robust = backdoor_job(
            spec, model, net, x_eval=x, y_eval=y, data_root=data_root, progress=progress
        )
        return finish(metrics, clean, robust, details)
    if spec.get("kind") == "pate":
        metrics, details, clean, robust, subtasks = pate_job(
            spec,
            model,
            x_eval=x,
            y_eval=y,
            indices=indices,
            data_root=data_root,
            device=device,
            progress=progress,
        )
        return finish(metrics, clean, robust, details, subtasks)
    if spec.get("kind") == "corruption":
        batch_size = int(spec.get("batch_size", 256))
        clean = logits_of(defended, x, batch_size).argmax(1) == y
        k = int(clean.sum())
        low, high = outcomes.wilson_interval(k, len(y))
        metrics = [
            Metric("clean_accuracy", k / len(y), len(y), low, high),
            *corruption_metrics(defended, x, y, batch_size=batch_size, seed=seed),
        ]
        if progress:
            progress(len(y), len(y))
        return finish(metrics, clean, clean, {})
    if spec.get("kind") == "calibration":
        metrics, details, clean, robust = calibration_job(
            spec,
            defended,
            x,
            y,
            indices,
            artifacts=artifacts,
            data_root=data_root,
            device=device,
        )
        if progress:
            progress(len(y), len(y))
        return finish(metrics, clean, clean & robust, details)
    flags = reliability.model_flags(surface, x[:CHECK_POINTS], y[:CHECK_POINTS])

    attack = build_attack(spec["attack"], spec.get("params") or {})
    threat = None if spec.get("norm") is None else Threat(spec["norm"], float(spec["eps"]))
    if attack.needs_train_data:
        x_train, y_train = load_split(spec["dataset"], "train", data_root)
        generator = torch.Generator(device=device).manual_seed(seed)
        attack.fit(surface, x_train.to(device), y_train.to(device), threat, generator)

    batch_size = int(spec.get("batch_size", 256))
    checkpoint = Checkpoint(artifacts, checkpoint_name) if checkpoint_name else None
    result, rejected = run_chunks(
        attack,
        surface,
        defended,
        x,
        y,
        threat,
        seed=seed,
        batch_size=batch_size,
        checkpoint=checkpoint,
        progress=progress,
    )
    metrics = attack_metrics(x, result)
    details = {
        "attack_config": repr(attack),
        "grad_evals": result.grad_evals,
        "adaptations": adaptations,
        "flags": flags,
    }
    if spec.get("defense"):
        details["defense_config"] = repr(defended)
    if getattr(defended, "rejects", False):
        metrics.extend(rejection_metrics(rejected))
    if getattr(attack, "breakdown", None):
        details["breakdown"] = dict(attack.breakdown)  # points each ensemble member broke
    sweep = sorted(float(e) for e in spec.get("eps_sweep") or [])
    if sweep:
        curve = []
        for eps in sweep:
            part, _ = run_chunks(
                attack,
                surface,
                defended,
                x,
                y,
                Threat(spec["norm"], eps),
                seed=seed,
                batch_size=batch_size,
                checkpoint=None,
                progress=None,
            )
            k = int((part.robust & part.clean_correct).sum())
            low, high = outcomes.wilson_interval(k, len(y))
            metrics.append(Metric(f"robust_accuracy@{eps:g}", k / len(y), len(y), low, high))
            curve.append(k / len(y))
        details["curve"] = {"eps": sweep, "robust_accuracy": curve}
        flags.extend(reliability.curve_flags(sweep, curve))
    if checkpoint:
        checkpoint.clear()
    return finish(metrics, result.clean_correct, result.robust & result.clean_correct, details)

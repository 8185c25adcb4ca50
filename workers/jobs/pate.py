"""The ``pate`` job kind: teachers in parallel, a noisy aggregate, a student, and the privacy cost.

(Papernot et al. 2017, arXiv 1610.05755; 2018, arXiv 1802.08908.) The training split is
cut into ``teachers`` disjoint partitions; each trains the job's architecture from
scratch as its own Ray task (``workers.fanout``), a backdoor planted in the first
``backdoored_teachers`` of them. The teachers vote on public queries: test images
outside the job's evaluation subset. The noisy aggregate (``spec["attack"]`` names it:
``lnmax``, ``gnmax`` or ``confident-gnmax``) labels the answered queries, and a student
learns from those labels alone. The student is scored on the evaluation subset.

Teachers return only their predicted labels, never weights: the aggregate is all the
student (and the privacy analysis) may see.
"""

from __future__ import annotations

import numpy as np
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers import privacy
from gauntlet.workers.backdoor import backdoor_labels, build_trigger, train_backdoored
from gauntlet.workers.backdoor.metrics import predict, rate_metric
from gauntlet.workers.backdoor.training import frozen
from gauntlet.workers.context import JobContext
from gauntlet.workers.datasets import load_split
from gauntlet.workers.fanout import run_parallel
from gauntlet.workers.hyperparams import expect_bool, expect_float, expect_int
from gauntlet.workers.jobs import HOUR, JobKind, check_procedure, register_kind
from gauntlet.workers.models import InputSpec
from gauntlet.workers.privacy import aggregation
from gauntlet.workers.results import JobResult, Metric
from gauntlet.workers.training import fit, fresh_model

METHODS = ("lnmax", "gnmax", "confident-gnmax")
_PARAMS = {
    "teachers",
    "backdoored_teachers",
    "trigger",
    "trigger_params",
    "target",
    "poison_rate",
    "queries",
    "noise",
    "gamma",
    "sigma",
    "threshold",
    "sigma1",
    "delta",
    "epochs",
    "student_epochs",
    "lr",
    "batch_size",
    "teacher_gpus",
}


def check_pate(method: str, params: dict) -> dict:
    """Validated settings with defaults; GauntletError on anything unknown or out of range.

    The Confident-GNMax defaults scale the paper's MNIST setting (250 teachers: threshold
    200, sigma1 150, sigma2 40) to the number of teachers.
    """
    check_procedure(
        method, METHODS, params, _PARAMS, what="PATE aggregator", params_what="PATE parameter(s)"
    )
    teachers = _teachers(params.get("teachers", 10))
    backdoored = expect_int(
        "backdoored_teachers", params.get("backdoored_teachers", 0), 0, teachers
    )
    trigger = params.get("trigger", "square")
    trigger_params = params.get("trigger_params") or {}
    build_trigger(trigger, trigger_params)  # validates both
    return {
        "teachers": teachers,
        "backdoored_teachers": backdoored,
        "trigger": trigger,
        "trigger_params": dict(trigger_params),
        "target": expect_int("target", params.get("target", 0), 0),
        "poison_rate": expect_float("poison_rate", params.get("poison_rate", 0.1), 0.0, 1.0),
        "queries": expect_int("queries", params.get("queries", 200), 1, 1_000_000),
        "noise": expect_bool("noise", params.get("noise", True)),
        "gamma": expect_float("gamma", params.get("gamma", 0.5), 0.0, 1e6),
        "sigma": expect_float("sigma", params.get("sigma", 0.16 * teachers), 0.0, 1e6),
        "threshold": expect_float("threshold", params.get("threshold", 0.8 * teachers), 0.0, 1e6),
        "sigma1": expect_float("sigma1", params.get("sigma1", 0.6 * teachers), 0.0, 1e6),
        "delta": expect_float("delta", params.get("delta", 1e-5), 0.0, 1.0),
        "epochs": expect_int("epochs", params.get("epochs", 30), 1, 10_000),
        "student_epochs": expect_int("student_epochs", params.get("student_epochs", 30), 1, 10_000),
        "lr": expect_float("lr", params.get("lr", 1e-3), 0.0, 1.0),
        "batch_size": expect_int("batch_size", params.get("batch_size", 32), 1, 100_000),
        "teacher_gpus": _gpus(params.get("teacher_gpus", 0.0)),
    }


def _teachers(value) -> int:
    """The teacher count, under the deployment's cap: each teacher is a training run."""
    from gauntlet.cluster.settings import Settings

    teachers = expect_int("teachers", value, 1)
    cap = Settings.from_env().max_pate_teachers
    if teachers > cap:
        raise GauntletError(
            f"Expected `teachers` to be at most {cap} (GAUNTLET_MAX_PATE_TEACHERS), "
            f"but got {teachers}"
        )
    return teachers


def _gpus(value) -> float:
    """GPUs per teacher: 0 (CPU), a fraction below 1 (small models share), or whole GPUs."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    gpus = expect_float("teacher_gpus", value, 0.0, 64.0)
    if gpus > 1 and gpus != int(gpus):
        raise GauntletError(f"Expected `teacher_gpus` below 1 or whole, but got {value!r}")
    return gpus


def train_teacher(
    x: torch.Tensor,
    y: torch.Tensor,
    queries: torch.Tensor,
    probes: torch.Tensor,
    arch: str,
    spec: dict,
    settings: dict,
    backdoored: bool,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher (a Ray task): its labels for the public queries and for ``probes``.

    A backdoored teacher poisons ``poison_rate`` of its own partition (all-to-one).
    """
    torch.set_num_threads(1)  # teachers run side by side; each gets one core
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trigger = build_trigger(settings["trigger"], settings["trigger_params"])
    model, _ = train_backdoored(
        x.to(device),
        y.to(device),
        trigger,
        rate=settings["poison_rate"] if backdoored else 0.0,
        target=settings["target"],
        arch=arch,
        spec=InputSpec.from_dict(spec),
        epochs=settings["epochs"],
        lr=settings["lr"],
        batch_size=settings["batch_size"],
        seed=seed,
    )
    return predict(model, queries.to(device)).cpu(), predict(model, probes.to(device)).cpu()


def _partitions(n: int, teachers: int, seed: int) -> list[np.ndarray]:
    if teachers > n:
        raise GauntletError(f"{teachers} teachers need at least {teachers} training images")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, teachers)]


def _aggregate(method: str, counts: torch.Tensor, s: dict, generator) -> tuple:
    """(labels, answered) for each query under the configured mechanism."""
    if not s["noise"]:
        labels = aggregation.plurality(counts)
        return labels, torch.ones_like(labels, dtype=torch.bool)
    if method == "lnmax":
        labels = aggregation.lnmax(counts, s["gamma"], generator)
    elif method == "gnmax":
        labels = aggregation.gnmax(counts, s["sigma"], generator)
    else:
        votes = aggregation.confident_gnmax(
            counts, s["threshold"], s["sigma1"], s["sigma"], generator
        )
        return votes.labels, votes.answered
    return labels, torch.ones_like(labels, dtype=torch.bool)


def _privacy(method: str, counts: torch.Tensor, answered: torch.Tensor, s: dict) -> list[Metric]:
    """eps (data-dependent and data-independent) for the answers given, and delta."""
    if not s["noise"]:
        return []  # a noiseless plurality has no finite privacy guarantee
    delta = s["delta"]
    if method == "lnmax":
        spent = privacy.lnmax_eps_data_dependent(counts[answered], s["gamma"], delta)
        bound = privacy.lnmax_eps_data_independent(int(answered.sum()), s["gamma"], delta)
    elif method == "gnmax":
        spent = privacy.gnmax_eps_data_dependent(counts[answered], s["sigma"], delta)
        bound = privacy.gnmax_eps_data_independent(int(answered.sum()), s["sigma"], delta)
    else:
        args = (counts, answered, s["sigma1"], s["sigma"], delta)
        spent = privacy.confident_gnmax_eps(*args)
        bound = privacy.confident_gnmax_eps(*args, data_dependent=False)
    n = len(counts)
    return [
        Metric("eps", spent.eps, n),
        Metric("eps_data_independent", bound.eps, n),
        Metric("delta", delta, n),
    ]


def run(ctx: JobContext) -> JobResult:
    """Student correct, and student correct under the trigger, are the job's outcomes;
    each teacher's task is recorded as a sub-task.

    Progress is (done, teachers + 1): each teacher that finishes, then the student.
    """
    spec, model, device, progress, data_root = (
        ctx.spec,
        ctx.model,
        ctx.device,
        ctx.progress,
        ctx.data_root,
    )
    x_eval, y_eval, indices = ctx.eval_data
    s = check_pate(spec["attack"], spec.get("params") or {})
    method, seed = spec["attack"], int(spec["seed"])
    input_spec = InputSpec.from_dict(model["input_spec"])
    num_classes = input_spec.num_classes
    if s["target"] >= num_classes:
        raise GauntletError(f"`target` {s['target']} is not one of the {num_classes} classes")
    x_train, y_train = load_split(spec["dataset"], "train", data_root)
    x_test, y_test = load_split(spec["dataset"], "test", data_root)
    # Public queries: test images outside the evaluation subset, in a seeded order.
    outside = np.setdiff1d(np.arange(len(y_test)), indices.cpu().numpy())
    public = np.random.default_rng(seed).permutation(outside)[: s["queries"]]
    if len(public) == 0:
        raise GauntletError("no test images are left outside the evaluation subset to query")
    x_pub, y_pub = x_test[public], y_test[public]

    trigger = build_trigger(s["trigger"], s["trigger_params"])
    x_eval, y_eval = x_eval.cpu(), y_eval.cpu()
    attacked = y_eval != s["target"]
    probes = trigger.stamp(x_eval[attacked])
    pieces = []
    for t, part in enumerate(_partitions(len(y_train), s["teachers"], seed)):
        backdoored = t < s["backdoored_teachers"]
        args = (
            x_train[part],
            y_train[part],
            x_pub,
            probes,
            model["arch"],
            model["input_spec"],
            s,
            backdoored,
            seed * 1_000 + t,
        )
        pieces.append((f"teacher-{t}", args))
    steps = s["teachers"] + 1

    def teacher_done(done: int, _total: int) -> None:
        if progress:
            progress(done, steps)

    outputs, records = run_parallel(
        train_teacher, pieces, num_gpus=s["teacher_gpus"], on_done=teacher_done
    )
    pub_votes = torch.stack([o[0] for o in outputs])
    probe_votes = torch.stack([o[1] for o in outputs])

    generator = torch.Generator().manual_seed(seed)
    counts = aggregation.vote_counts(pub_votes, num_classes)
    labels, answered = _aggregate(method, counts, s, generator)
    if not answered.any():
        raise GauntletError("the aggregate answered no query; lower `threshold` or `sigma1`")

    student = fresh_model(model["arch"], input_spec, seed, device)
    fit(
        student,
        x_pub[answered].to(device),
        labels[answered].to(device),
        epochs=s["student_epochs"],
        lr=s["lr"],
        batch_size=s["batch_size"],
        seed=seed,
    )
    student = frozen(student)
    if progress:
        progress(steps, steps)
    correct = predict(student, x_eval.to(device)).cpu() == y_eval
    triggered = predict(student, trigger.stamp(x_eval).to(device)).cpu()
    wanted = backdoor_labels(y_eval, "all-to-one", s["target"], num_classes)

    # The same mechanism on triggered evaluation images: does the planted backdoor
    # survive the vote? (Plurality when noise is off.)
    probe_labels, probe_answered = _aggregate(
        method, aggregation.vote_counts(probe_votes, num_classes), s, generator
    )
    metrics = [
        rate_metric("student_accuracy", correct),
        rate_metric("student_attack_success_rate", (triggered == wanted)[attacked]),
        rate_metric("aggregate_attack_success_rate", probe_labels[probe_answered] == s["target"]),
        rate_metric("label_accuracy", labels[answered] == y_pub[answered]),
        rate_metric("answered", answered),
        *_privacy(method, counts, answered, s),
    ]
    if s["backdoored_teachers"]:
        planted = probe_votes[: s["backdoored_teachers"]] == s["target"]
        metrics.append(rate_metric("backdoored_teacher_attack_success_rate", planted.flatten()))
    details = {
        "method": method,
        "settings": s,
        "queries": len(public),
        "answered": int(answered.sum()),
        "teachers": s["teachers"],
    }
    return ctx.result(metrics, correct, correct & (triggered == y_eval), details, records)


# Teachers train in parallel where the cluster allows, but may queue behind each other.
register_kind(JobKind("pate", run, board="privacy", check=check_pate, time_limit_s=12 * HOUR))

"""The ``eval`` job kind: robust accuracy of a (defended) model under one attack.

The attack runs on the *attack surface*: the model, or for a defended model its
adaptive stand-in (BPDA, EOT). Whether a point is robust is always judged on the
defended model itself. For a transfer job the surface is the source (surrogate) model,
or an ensemble of surrogates.
"""

from __future__ import annotations

import torch

from gauntlet.workers import gpu, results, shards
from gauntlet.workers.attacks import AttackResult, Threat, build_attack, tallies
from gauntlet.workers.attacks import flags as reliability
from gauntlet.workers.attacks.dknn_adaptive import against_rejection
from gauntlet.workers.attacks.metrics import attack_metrics
from gauntlet.workers.batches import predict_in_batches
from gauntlet.workers.context import JobContext
from gauntlet.workers.defenses import Defense
from gauntlet.workers.defenses.adaptive import attack_surface
from gauntlet.workers.jobs import HOUR, JobKind, draws, register_kind
from gauntlet.workers.results import JobResult, Metric

# Points used for the reliability checks: enough to see masking, cheap to run.
CHECK_POINTS = 64


class SurrogateEnsemble(torch.nn.Module):
    """Several surrogates as one model: their mean logits (Liu et al. 2017)."""

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(models)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def decide(defended, x, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, accepted) of the deployed model; only rejecting defenses refuse."""
    if isinstance(defended, Defense):
        return predict_in_batches(defended.decide, x, batch_size)
    pred = predict_in_batches(defended, x, batch_size, output=lambda out: out.argmax(1))
    return pred, torch.ones_like(pred, dtype=torch.bool)


def _judge(defended, x, x_adv, y, batch_size: int):
    """(clean correct, robust, rejected) on the deployed model, whatever the attack ran on.

    A rejected clean input is not a correct answer; a rejected adversarial input is a
    defended one (the attack did not get a wrong label through). ``rejected`` is (n, 2):
    the clean input, the adversarial one.
    """
    clean, robust, rejected, _, _ = draws.judge_draws(decide, defended, x, x_adv, y, batch_size, 1)
    return clean, robust, rejected


def rejection_metrics(rejected: torch.Tensor) -> list[Metric]:
    """Shares of clean and of adversarial inputs the defense refused to answer."""
    metrics = []
    for column, name in enumerate(("rejected_clean", "rejected_adversarial")):
        k, n = int(rejected[:, column].sum()), len(rejected)
        low, high = results.wilson_interval(k, n)
        metrics.append(Metric(name, k / n, n, low, high))
    return metrics


def rejection_bits(rejected: torch.Tensor) -> dict[str, str]:
    """Which clean and adversarial inputs were rejected, as hex of ``results.pack``: the
    leaderboard credits a rejection only in an adaptive result, so it needs them per point."""
    return {
        name: results.pack(rejected[:, column]).hex()
        for column, name in enumerate(("clean", "adversarial"))
    }


def run_chunks(
    attack,
    surface,
    defended,
    x,
    y,
    threat,
    *,
    seed,
    batch_size,
    checkpoint,
    progress,
    k=1,
    offset=0,
) -> tuple[AttackResult, torch.Tensor, torch.Tensor]:
    """The attack's result, which clean and adversarial inputs were rejected (n, 2), and
    per draw of the judge's ``k`` which points were clean-correct and robust (2, k, n).

    Attacks in chunks of ``batch_size``, saving per-example state after each chunk.
    ``offset``: where ``x`` starts in the job's points (a shard, ``workers.shards``), so
    each chunk draws the randomness it would draw in the unsharded run.
    """
    n = len(x)
    state = checkpoint.load() if checkpoint else None
    stale = state is None or "draws" not in state or state["x_adv"].shape != x.shape
    stale = stale or state["draws"].shape != (2, k, n)
    if stale or int(state["done"]) > n:
        state = {
            "done": torch.tensor(0),
            "x_adv": x.detach().cpu().clone(),
            "clean": torch.zeros(n, dtype=torch.bool),
            "robust": torch.zeros(n, dtype=torch.bool),
            "rejected": torch.zeros(n, 2, dtype=torch.bool),
            "draws": torch.zeros(2, k, n, dtype=torch.bool),
            "queries": torch.zeros(n, dtype=torch.int64),
            "grad_evals": torch.tensor(0),
        }
    # The attack's counts are saved too, so a resumed run reports the batches before
    # the interruption as well.
    tallies.from_state(attack, state)
    black_box = False
    for start in range(int(state["done"]), n, batch_size):
        sl = slice(start, start + batch_size)
        chunk_seed = seed * 1_000_003 + offset + start
        generator = torch.Generator(device=x.device).manual_seed(chunk_seed)
        gpu.seed_everything(chunk_seed)  # randomized defenses draw from here
        part = attack(surface, x[sl], y[sl], threat, batch_size=batch_size, generator=generator)
        clean, robust = part.clean_correct, part.robust
        if (
            defended is not surface
            or getattr(defended, "randomized", False)
            or getattr(defended, "rejects", False)
        ):
            # Judge on the deployed model with fresh randomness, k times (see draws.py):
            # what one draw of a random model does says little about the next one.
            clean, robust, rejected, per_clean, per_robust = draws.judge_draws(
                decide, defended, x[sl], part.x_adv, y[sl], batch_size, k
            )
            state["rejected"][sl] = rejected.cpu()
            state["draws"][:, :, sl] = torch.stack([per_clean, per_robust]).cpu()
        else:
            state["draws"][:, :, sl] = torch.stack([clean, robust])[:, None].cpu()
        state["x_adv"][sl] = part.x_adv.detach().cpu()
        state["clean"][sl], state["robust"][sl] = clean.cpu(), robust.cpu()
        if part.queries is not None:
            black_box = True
            state["queries"][sl] = part.queries.cpu()
        state["grad_evals"] = state["grad_evals"] + part.grad_evals
        state["done"] = torch.tensor(min(start + batch_size, n))
        state.update(tallies.to_state(attack))
        if checkpoint:
            checkpoint.save(state)
        if progress:
            progress(int(state["done"]), n)
    return (
        AttackResult(
            x_adv=state["x_adv"].to(x.device),
            clean_correct=state["clean"],
            robust=state["robust"],
            grad_evals=int(state["grad_evals"]),
            queries=state["queries"] if black_box or attack.black_box else None,
        ),
        state["rejected"],
        state["draws"],
    )


def _surface(ctx: JobContext):
    """What the attack takes its gradients from, and the adaptations that were made."""
    spec = ctx.spec
    eot = draws.eot_samples(spec, ctx.defended)  # 20 for autoattack's "rand"
    surface, adaptations = attack_surface(
        ctx.defended, adaptive=spec.get("adaptive", True), eot_samples=eot
    )
    if spec.get("source_model"):
        (surface,) = ctx.other_models([spec["source_model"]], "transfer source model")
        adaptations = [*adaptations, "transfer"]
    if spec.get("source_ensemble"):
        members = ctx.other_models(spec["source_ensemble"], "a surrogate model of this ensemble")
        surface = SurrogateEnsemble(members)
        adaptations = [*adaptations, f"transfer-ensemble-{len(members)}"]
    return surface, adaptations


def prepare(ctx: JobContext):
    """(surface, adaptations, params, attack, k, threat): built alike by the job and by
    each of its shards (``workers.shards``), so every piece runs the same attack."""
    spec, defended = ctx.spec, ctx.defended
    surface, adaptations = _surface(ctx)
    params = draws.attack_params(spec, defended, ctx.params)  # autoattack: "rand" if random
    attack = build_attack(spec["attack"], params)
    # A rejecting defense is attacked for an accepted wrong answer (dknn_adaptive.py).
    adaptive = spec.get("adaptive", True)
    attack, adaptations = against_rejection(attack, defended, adaptations, adaptive=adaptive)
    k = draws.draws_of(spec, defended)
    threat = None if spec.get("norm") is None else Threat(spec["norm"], float(spec["eps"]))
    return surface, adaptations, params, attack, k, threat


def run(ctx: JobContext) -> JobResult:
    spec, defended = ctx.spec, ctx.defended
    surface, adaptations, params, attack, k, threat = prepare(ctx)
    x, y, _ = ctx.eval_data
    seed, batch_size = ctx.seed, ctx.batch_size
    # Gradient-masking checks concern attacks: clean accuracy has none to mislead.
    flags = []
    if spec.get("norm") is not None:
        flags = reliability.model_flags(surface, x[:CHECK_POINTS], y[:CHECK_POINTS])
    if attack.needs_train_data:
        x_train, y_train = ctx.train_split()
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        attack.fit(surface, x_train, y_train, threat, generator)

    def attack_all(budget, checkpoint, progress):
        return run_chunks(
            attack,
            surface,
            defended,
            x,
            y,
            budget,
            seed=seed,
            batch_size=batch_size,
            checkpoint=checkpoint,
            progress=progress,
            k=k,
        )

    # Large jobs on a cluster run as shards on several GPUs, merged to the same result.
    bounds, subtasks, split = shards.plan(ctx, attack), [], None
    if bounds:
        result, rejected, per_draw, subtasks, split = shards.attack_sharded(ctx, attack, bounds)
    else:
        result, rejected, per_draw = attack_all(threat, ctx.checkpoint, ctx.progress)
    ctx.adversarial = result.x_adv
    flags.extend(reliability.attack_flags(attack))
    metrics = attack_metrics(x, result)
    details = {
        "attack_config": repr(attack),
        "grad_evals": result.grad_evals,
        "adaptations": adaptations,
        "flags": flags,
    }
    if split:
        details["shards"] = split  # where each shard's points start and stop, resumed where
    if spec.get("defense"):
        details["defense_config"] = repr(defended)
    if getattr(defended, "rejects", False):
        metrics.extend(rejection_metrics(rejected))
        details["rejected"] = rejection_bits(rejected)
    if getattr(attack, "breakdown", None):
        details["breakdown"] = dict(attack.breakdown)  # points each ensemble member broke
    if spec["attack"] == "autoattack":
        details["autoattack_version"] = params.get("version", "standard")
    if draws.is_randomized(defended):
        mean_draw, details["draws"] = draws.draw_summary(*per_draw)
        metrics.append(mean_draw)
    sweep = sorted(float(e) for e in spec.get("eps_sweep") or [])
    if sweep:
        curve = []
        for eps in sweep:
            part, _, _ = attack_all(Threat(spec["norm"], eps), None, None)
            metrics.append(
                ctx.accuracy(f"robust_accuracy@{eps:g}", part.robust & part.clean_correct)
            )
            curve.append(metrics[-1].value)
        details["curve"] = {"eps": sweep, "robust_accuracy": curve}
        flags.extend(reliability.curve_flags(sweep, curve))
    if ctx.checkpoint:
        ctx.checkpoint.clear()
    robust = result.robust & result.clean_correct
    return ctx.result(metrics, result.clean_correct, robust, details, subtasks)


def _transfer_sources(spec: dict) -> list[str]:
    return [m for m in [spec.get("source_model"), *(spec.get("source_ensemble") or [])] if m]


# An attack on a subset of points: two hours is generous for any shipped suite.
register_kind(
    JobKind("eval", run, board="leaderboard", models=_transfer_sources, time_limit_s=2 * HOUR)
)

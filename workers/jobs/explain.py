"""The ``explain`` job kind: attribution maps of a model, clean and under attack.

For the job's evaluation subset (``n`` seeded test points, 8 from the CLI) it computes
LIME on SLIC superpixels, gradient saliency and integrated gradients (see
``workers.explain``) for the clean inputs and for adversarial ones (FGSM or PGD, the
job's ``attack``, at the Linf budget ``eps`` the request resolved). The maps are stored
as safetensors and drawn as one PNG grid per method; the result records their hashes
and, per method, the mean absolute attribution (clean, adversarial) and the Spearman
rank correlation between each point's clean and adversarial map: how far an attack that
changes the answer also changes the explanation.
"""

from __future__ import annotations

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers import explain
from gauntlet.workers.attacks import Threat, build_attack
from gauntlet.workers.context import JobContext
from gauntlet.workers.jobs import HOUR, JobKind, check_procedure, register_kind
from gauntlet.workers.results import JobResult, Metric

ATTACKS = ("fgsm", "pgd")
DEFAULTS = {"methods": list(explain.METHODS), "eps": None, "pgd_steps": 10, **explain.DEFAULTS}
_LIMITS = {
    "segments": (2, 1000),
    "lime_samples": (10, 100_000),
    "ig_steps": (2, 10_000),
    "pgd_steps": (1, 1000),
}


def check(method: str, params: dict) -> dict:
    """The settings with defaults; GauntletError naming what is wrong."""
    check_procedure(
        method,
        ATTACKS,
        params,
        DEFAULTS,
        what="explanation attack",
        params_what="explanation parameter(s)",
    )
    s = DEFAULTS | params
    methods = s["methods"]
    if isinstance(methods, str):
        methods = [methods]
    if (
        not isinstance(methods, list)
        or not methods
        or any(m not in explain.METHODS for m in methods)
    ):
        raise GauntletError(
            f"Expected `methods` to be a non-empty list of {', '.join(explain.METHODS)}, "
            f"but got {s['methods']!r}"
        )
    # One order whatever the request's, so the same methods are the same job.
    s["methods"] = [m for m in explain.METHODS if m in methods]
    eps = s["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        # No default here: the customary budget depends on the dataset, which the
        # requester knows (it reads the quick suite's table) and this check does not.
        raise GauntletError(f"Expected `eps` to be a Linf budget in (0, 1], but got {eps!r}")
    s["eps"] = float(eps)
    for key, (low, high) in _LIMITS.items():
        value = s[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise GauntletError(
                f"Expected `{key}` to be an int in [{low}, {high}], but got {value!r}"
            )
    return s


def run(ctx: JobContext) -> JobResult:
    s = check(ctx.spec["attack"], ctx.params)
    # The bare network: explanations need its gradients, and a defense's preprocessing
    # is not what is being explained.
    model, store = ctx.net, ctx.store
    x, y, indices = ctx.eval_data
    attack = build_attack(
        ctx.spec["attack"], {"steps": s["pgd_steps"]} if ctx.spec["attack"] == "pgd" else {}
    )
    generator = torch.Generator(device=x.device).manual_seed(ctx.seed)
    adv = attack(
        model, x, y, Threat("linf", s["eps"]), batch_size=ctx.batch_size, generator=generator
    )
    x_adv = adv.x_adv.detach()
    pred, pred_adv = explain.predictions(model, x), explain.predictions(model, x_adv)
    inputs = store.put_bytes(
        explain.save_maps(
            {
                "x": x,
                "x_adv": x_adv,
                "y": y,
                "pred": pred,
                "pred_adv": pred_adv,
                "indices": torch.as_tensor(indices),
            }
        )
    )
    metrics, per_method = [], {}
    artifacts = {"inputs": inputs}
    steps = len(s["methods"])
    for done, method in enumerate(s["methods"]):
        clean = explain.attribute(model, x, pred, method, s, seed=ctx.seed)
        adversarial = explain.attribute(model, x_adv, pred_adv, method, s, seed=ctx.seed)
        corr = explain.rank_correlation(clean, adversarial)
        maps = store.put_bytes(explain.save_maps({"clean": clean, "adversarial": adversarial}))
        grid = store.put_bytes(
            explain.grid_png(
                x,
                x_adv,
                clean,
                adversarial,
                labels=(pred, pred_adv),
                title=f"{method}: {ctx.dataset}, {ctx.spec['attack']} eps {s['eps']:g}",
            )
        )
        summary = {
            "maps": maps,
            "grid": grid,
            "mean_abs_clean": explain.mean_abs(clean),
            "mean_abs_adversarial": explain.mean_abs(adversarial),
            "rank_correlation": float(corr.mean()),
        }
        per_method[method] = summary
        artifacts |= {f"{method}_maps": maps, f"{method}_grid": grid}
        for name in ("mean_abs_clean", "mean_abs_adversarial", "rank_correlation"):
            metrics.append(Metric(f"{method}_{name}", summary[name], len(x)))
        ctx.report(done + 1, steps)
    clean_ok, robust = pred == y, (pred == y) & (pred_adv == y)
    metrics += [ctx.accuracy("clean_accuracy", clean_ok), ctx.accuracy("robust_accuracy", robust)]
    details = {
        "attack_config": repr(attack),
        "eps": s["eps"],
        "methods": s["methods"],
        "explanations": per_method,
        # Flat name -> sha256, so listings need not know the kinds' layouts.
        "artifacts": artifacts,
    }
    return ctx.result(metrics, clean_ok, robust, details)


# A few points and a few hundred forward passes per method: minutes on a CPU.
register_kind(JobKind("explain", run, board="explanations", check=check, time_limit_s=1 * HOUR))

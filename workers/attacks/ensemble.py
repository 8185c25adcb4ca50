"""AutoAttack (Croce & Hein 2020) as one attack: its members in sequence, each run
only on the points every earlier member left robust.

The "standard" version is APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes)
and Square (5000 queries), 100 iterations and 1 restart each. The "rand" version, the
reference's for randomized defenses, is APGD-CE and APGD-DLR, 100 iterations and 1
restart each, every gradient the mean over ``RAND_EOT_ITER`` = 20 random draws (the
reference's ``eot_iter``). The result is the per-example worst case over the members;
``breakdown`` says how many points each member broke, which the evaluation stores with
the job.
"""

from __future__ import annotations

import time

import torch

from gauntlet.workers.attacks.base import Attack, RunOutput
from gauntlet.workers.attacks.layout import channels_last
from gauntlet.workers.attacks.registry import build_attack, register_attack
from gauntlet.workers.attacks.square import margin
from gauntlet.workers.hyperparams import integer, one_of

# Rows per pass when APGD-T and FAB-T stack target classes (see ``stacking``): a few
# points run all their targets at once, a batch of 1024 or more one target at a time.
STACK_ROWS = 1024


def standard_members(steps: int, queries: int, targets: int) -> list[tuple[str, dict]]:
    targeted = {"steps": steps, "n_target_classes": targets, "stack_rows": STACK_ROWS}
    return [
        ("apgd-ce", {"steps": steps}),
        ("apgd-t", targeted),
        ("fab-t", targeted),
        ("square", {"queries": queries}),
    ]


def rand_members(steps: int, queries: int, targets: int) -> list[tuple[str, dict]]:
    # The reference sets no targets and no query budget for it: both are unused here.
    return [("apgd-ce", {"steps": steps}), ("apgd-dlr", {"steps": steps})]


VERSIONS = {"standard": standard_members, "rand": rand_members}


def run_member(member, model, x, y, idx, threat, generator, ensemble, active: list[int]):
    """``member``'s output on the points ``idx``, its time added to ``ensemble.seconds``
    and its active-example counts to ``active``."""
    start = time.perf_counter()
    out = member.run(model, x[idx], y[idx], threat, generator)
    ensemble.seconds[member.name] += time.perf_counter() - start
    active.extend(out.active_per_step)
    return out


# Draws per gradient in the "rand" version (the reference's ``eot_iter``).
RAND_EOT_ITER = 20


@register_attack
class AutoAttack(Attack):
    name = "autoattack"
    # 2: APGD-T and FAB-T stack their target classes (same points fooled in law, other draws).
    version = 2

    hyperparams = {
        "version": one_of("standard", tuple(VERSIONS)),
        "steps": integer(100, 1, 10_000),
        "queries": integer(5000, 1, 1_000_000),
        "n_target_classes": integer(9, 1, 1000),
    }

    def prepare(self) -> None:
        members = VERSIONS[self.version](self.steps, self.queries, self.n_target_classes)
        self.members = [build_attack(name, params) for name, params in members]
        self.breakdown: dict[str, int] = {m.name: 0 for m in self.members}
        self.seconds: dict[str, float] = {m.name: 0.0 for m in self.members}

    def check(self, threat) -> None:
        for member in self.members:
            member.check(threat)

    def run(self, model, x, y, threat, generator) -> RunOutput:
        if self.version == "rand" and getattr(model, "stop_early", True):
            # Not yet an EOT surface (the evaluation builds one for a randomized defense):
            # "rand" brings its own, so its members keep attacking for their whole budget.
            from gauntlet.workers.defenses.adaptive import EOT

            model = EOT(model, RAND_EOT_ITER)
        # On a random model (an EOT surface, or a randomized defense attacked directly)
        # a point no member broke is judged later on fresh draws: it keeps the members'
        # attempt with the smallest margin on the model, not the clean input (where a
        # deterministic model's robust points stay).
        random = not getattr(model, "stop_early", True) or getattr(model, "randomized", False)
        model = channels_last(model, x)  # faster forward passes on a CPU; same function
        closest = torch.full((len(x),), torch.inf, device=x.device)
        x_adv = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        queries = torch.zeros(len(x), dtype=torch.int64, device=x.device)
        active_per_step: list[int] = []
        for member in self.members:
            idx = (~fooled).nonzero().squeeze(1)
            if not len(idx):
                break
            out = run_member(member, model, x, y, idx, threat, generator, self, active_per_step)
            if out.queries is not None:
                queries[idx] += out.queries.to(queries.device, torch.int64)
            broken = idx[out.fooled]
            if random and not out.fooled.all():
                kept, tried = idx[~out.fooled], out.x_adv[~out.fooled]
                with torch.no_grad():
                    gap = margin(model(tried), y[kept])
                nearer = gap < closest[kept]
                x_adv[kept[nearer]] = tried[nearer]
                closest[kept[nearer]] = gap[nearer]
            x_adv[broken] = out.x_adv[out.fooled]
            fooled[broken] = True
            self.breakdown[member.name] += len(broken)
        return RunOutput(x_adv, fooled, active_per_step, queries)

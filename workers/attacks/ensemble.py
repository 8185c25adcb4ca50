"""AutoAttack (Croce & Hein 2020) as one attack: its members in sequence, each run
only on the points every earlier member left robust.

The "standard" version is APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes)
and Square (5000 queries), 100 iterations and 1 restart each. The result is the
per-example worst case over the members; ``breakdown`` says how many points each
member broke, which the evaluation stores with the job.
"""

from __future__ import annotations

import time

import torch

from gauntlet.workers.attacks.base import Attack, RunOutput
from gauntlet.workers.attacks.registry import build_attack, register_attack
from gauntlet.workers.hyperparams import integer, one_of


def standard_members(steps: int, queries: int, targets: int) -> list[tuple[str, dict]]:
    return [
        ("apgd-ce", {"steps": steps}),
        ("apgd-t", {"steps": steps, "n_target_classes": targets}),
        ("fab-t", {"steps": steps, "n_target_classes": targets}),
        ("square", {"queries": queries}),
    ]


VERSIONS = {
    "standard": standard_members,
    # The cheaper set AutoAttack offers for randomized defenses and quick checks.
    "plus-free": lambda steps, queries, targets: [
        ("apgd-ce", {"steps": steps}),
        ("apgd-dlr", {"steps": steps}),
    ],
}


@register_attack
class AutoAttack(Attack):
    name = "autoattack"

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
        x_adv = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        queries = torch.zeros(len(x), dtype=torch.int64, device=x.device)
        active_per_step: list[int] = []
        for member in self.members:
            idx = (~fooled).nonzero().squeeze(1)
            if not len(idx):
                break
            start = time.perf_counter()
            out = member.run(model, x[idx], y[idx], threat, generator)
            self.seconds[member.name] += time.perf_counter() - start
            active_per_step.extend(out.active_per_step)
            if out.queries is not None:
                queries[idx] += out.queries.to(queries.device, torch.int64)
            broken = idx[out.fooled]
            x_adv[broken] = out.x_adv[out.fooled]
            fooled[broken] = True
            self.breakdown[member.name] += len(broken)
        return RunOutput(x_adv, fooled, active_per_step, queries)

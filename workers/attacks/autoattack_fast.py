"""``autoattack-fast``: AutoAttack's members, the expensive ones only where they can matter.

AutoAttack spends most of its time on points it cannot break: on a robust model FAB-T
and Square run their whole budget on every point APGD left robust, and nearly always
fail. This protocol runs the cheap stage on every point and the expensive stage only
on the points the cheap stage left close to the boundary:

1. APGD-CE, then APGD-T against the ``cheap_targets`` (4) most likely wrong classes,
   each on the points still robust (targets stacked, as in ``autoattack``).
2. The screen: a point still robust is *close* when its margin at the best point the
   cheap stage found, z_y - max_{i != y} z_i, is below ``screen`` (0.1) times its
   clean logit spread z_(1) - z_(3) (the DLR loss's scale: invariant to the logits'
   scale, so one threshold fits every model). The worst of the two members' points
   counts.
3. On close points only: APGD-T on the remaining targets up to ``n_target_classes``
   (the 5th to the 9th likeliest; the first four ran in stage 1 on these points), FAB-T
   on the ``fab_targets`` (3) likeliest and Square with ``queries`` (1000) queries, each
   on the points still robust.

A point far from the boundary after 100 steps of gradient ascent is one the others,
which search the same ball, do not flip on the models tested; the bench and the tests
measure the gap to ``autoattack`` (within 0.5 points). The split of the budget comes
from measurement: on the digits models APGD-T broke nearly every point that FAB-T and
Square did not, and the points ``autoattack`` broke but this protocol missed were
broken by APGD-T through a 4th or later target. So stage 1 covers four targets and
FAB-T, the minimum-norm check against masked gradients, needs only the likeliest
three. The premise needs the full step count: after 20 steps some points far from the
boundary by margin still fall to Square, so ``steps`` well below 100 weaken the screen.

On a random model (EOT, or a randomized defense) there is no margin to trust, so the
protocol runs ``autoattack``'s ``rand`` version instead.
"""

from __future__ import annotations

import torch

from gauntlet.workers.attacks.base import Attack, RunOutput
from gauntlet.workers.attacks.ensemble import STACK_ROWS, run_member
from gauntlet.workers.attacks.layout import channels_last
from gauntlet.workers.attacks.registry import build_attack, register_attack
from gauntlet.workers.attacks.square import margin
from gauntlet.workers.hyperparams import integer, span

_TINY = 1e-12


@register_attack
class AutoAttackFast(Attack):
    name = "autoattack-fast"
    # 2: four cheap targets, the expensive APGD-T skips them, FAB-T on three targets.
    version = 2

    hyperparams = {
        "steps": integer(100, 1, 10_000),
        "queries": integer(1000, 1, 1_000_000),
        "n_target_classes": integer(9, 1, 1000),
        "cheap_targets": integer(4, 1, 1000),
        "fab_targets": integer(3, 1, 1000),
        "screen": span(0.1, 0.0, 1000.0),
    }

    def prepare(self) -> None:
        targeted = {"steps": self.steps, "stack_rows": STACK_ROWS}
        self.cheap = [
            build_attack("apgd-ce", {"steps": self.steps}),
            build_attack("apgd-t", {**targeted, "n_target_classes": self.cheap_targets}),
        ]
        rest = {"n_target_classes": self.n_target_classes, "first_target": self.cheap_targets + 1}
        self.expensive = [
            # Targets the cheap stage left, if any.
            *(
                [build_attack("apgd-t", {**targeted, **rest})]
                if rest["first_target"] <= rest["n_target_classes"]
                else []
            ),
            build_attack("fab-t", {**targeted, "n_target_classes": self.fab_targets}),
            build_attack("square", {"queries": self.queries}),
        ]
        self.rand = build_attack("autoattack", {"version": "rand", "steps": self.steps})
        names = dict.fromkeys(m.name for m in self.cheap + self.expensive)
        self.breakdown: dict[str, int] = dict.fromkeys(names, 0)
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)
        self.screened = 0  # points that reached the expensive stage, over all batches

    def check(self, threat) -> None:
        for member in self.cheap + self.expensive:
            member.check(threat)

    def run(self, model, x, y, threat, generator) -> RunOutput:
        if not getattr(model, "stop_early", True) or getattr(model, "randomized", False):
            out = self.rand.run(model, x, y, threat, generator)
            self.breakdown, self.seconds = self.rand.breakdown, self.rand.seconds
            return out
        model = channels_last(model, x)  # faster forward passes on a CPU; same function
        x_adv = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        closest = torch.full((len(x),), torch.inf, device=x.device)
        active: list[int] = []
        with torch.no_grad():
            logits = model(x)
        top = logits.topk(min(3, logits.shape[1]), dim=1).values
        spread = (top[:, 0] - top[:, -1]).clamp_min(_TINY)
        for member in self.cheap:
            self._member(member, model, x, y, threat, generator, ~fooled, x_adv, fooled, active)
            idx = (~fooled).nonzero().squeeze(1)
            if len(idx):
                with torch.no_grad():
                    gap = margin(model(x_adv[idx]), y[idx])
                closest[idx] = torch.minimum(closest[idx], gap / spread[idx])
        close = ~fooled & (closest < self.screen)
        self.screened += int(close.sum())
        for member in self.expensive:
            self._member(member, model, x, y, threat, generator, close, x_adv, fooled, active)
            close &= ~fooled
        return RunOutput(x_adv, fooled, active)

    def _member(self, member, model, x, y, threat, generator, where, x_adv, fooled, active):
        """Run ``member`` on the points of ``where`` not yet fooled; record what it broke."""
        idx = (where & ~fooled).nonzero().squeeze(1)
        if not len(idx):
            return
        out = run_member(member, model, x, y, idx, threat, generator, self, active)
        broken = idx[out.fooled]
        # A robust point keeps the member's highest-loss attempt: the screen reads it.
        x_adv[idx] = out.x_adv
        fooled[broken] = True
        self.breakdown[member.name] += len(broken)

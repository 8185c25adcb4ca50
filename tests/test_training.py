"""The one training loop (workers.training) against steps and losses computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.training import distillation_loss, fit


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Linear(4, 3).double()
    return model, x, y


def _hand_step(w, b, x, y, lr):
    """One Adam step (zero state, default betas and eps) of mean cross-entropy on a
    linear model, the gradient written out: dL/dlogits = (softmax - onehot) / n."""
    logits = x @ w.T + b
    p = torch.exp(logits - logits.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    d = (p - torch.eye(3, dtype=x.dtype)[y]) / len(x)
    gw, gb = d.T @ x, d.sum(0)
    # Adam's first step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
    return w - lr * gw / (gw.abs() + 1e-8), b - lr * gb / (gb.abs() + 1e-8)


def test_one_full_batch_step_is_the_hand_computed_adam_step():
    model, x, y = _data()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    loss = fit(model, x, y, epochs=1, lr=0.05, batch_size=len(x))
    want_w, want_b = _hand_step(w, b, x, y, 0.05)
    torch.testing.assert_close(model.weight.detach(), want_w)
    torch.testing.assert_close(model.bias.detach(), want_b)
    # The reported loss is that of the batch the step was taken on.
    logp = torch.log_softmax(x @ w.T + b, 1)
    assert loss == pytest.approx(float(-logp[torch.arange(6), y].mean()), rel=1e-9)
    assert not model.training


def test_perturb_and_params_choose_the_batch_and_what_trains():
    model, x, y = _data()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    seen = []

    def shift(m, xb, yb):
        seen.append(m.training)
        return xb + 0.5

    fit(model, x, y, epochs=1, lr=0.05, batch_size=len(x), perturb=shift, params=[model.bias])
    _, want_b = _hand_step(w, b, x + 0.5, y, 0.05)
    assert seen == [False]  # crafted in eval mode
    torch.testing.assert_close(model.weight.detach(), w)  # not in params: untouched
    torch.testing.assert_close(model.bias.detach(), want_b)


def test_batches_follow_the_seeded_shuffle():
    model, x, y = _data()
    batches = []

    def record(logits, yb):
        batches.append(yb.tolist())
        return logits.sum() * 0

    fit(model, x, y, epochs=2, lr=0.01, batch_size=4, seed=7, loss=record)
    g = torch.Generator().manual_seed(7)
    want = []
    for _ in range(2):
        order = torch.randperm(6, generator=g)
        want += [y[order[:4]].tolist(), y[order[4:]].tolist()]
    assert batches == want


def test_fit_refuses_an_empty_parameter_list():
    model, x, y = _data()
    with pytest.raises(GauntletError, match="nothing to train"):
        fit(model, x, y, epochs=1, lr=0.01, batch_size=2, params=[])


def test_distillation_loss_is_the_kl_up_to_the_teacher_entropy():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], dtype=torch.float64)
    t = 2.0
    q = torch.softmax(student / t, 1)
    kl = (teacher * (teacher.log() - q.log())).sum(1).mean()
    entropy = -(teacher * teacher.log()).sum(1).mean()
    got = distillation_loss(student, teacher, t, scale=t**2)
    torch.testing.assert_close(got, (kl + entropy) * t**2)
    # Cross-entropy at T = 1 on one-hot targets is the ordinary cross-entropy.
    hard = torch.eye(3, dtype=torch.float64)[[1, 2]]
    torch.testing.assert_close(
        distillation_loss(student, hard, 1.0),
        torch.nn.functional.cross_entropy(student, torch.tensor([1, 2])),
    )

"""Workers keep loaded networks by content and give each job its own copy."""

from __future__ import annotations

import torch

from gauntlet.workers import model_cache
from gauntlet.workers.context import JobContext


def _ctx(stored):
    model, store = stored
    spec = {"dataset": "digits", "seed": 0, "n": 10, "attack": "clean", "batch_size": 10}
    ctx = JobContext(spec, model, store, "", device_label="cpu")
    ctx.device = torch.device("cpu")
    return ctx


def test_a_second_job_reuses_the_loaded_network_but_not_the_object(stored):
    first = _ctx(stored).net
    calls = []

    def load():  # would be called only on a miss
        calls.append(1)
        raise AssertionError("loaded again")

    key = model_cache.network_key(stored[0], torch.device("cpu"))
    second = model_cache.cached_network(key, load)
    assert not calls and second is not first
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    # What one job does to its copy never reaches the next job's.
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    third = _ctx(stored).net
    assert torch.equal(next(third.parameters()), next(second.parameters()))


def test_the_cache_keeps_only_the_latest_networks():
    made = []
    for i in range(model_cache.MAX_MODELS + 2):
        model_cache.cached_network(("sha", i), lambda i=i: made.append(i) or torch.nn.Linear(1, 1))
    # The oldest two were evicted: asking for them loads again, the newest do not.
    model_cache.cached_network(("sha", 0), lambda: made.append("again") or torch.nn.Linear(1, 1))
    model_cache.cached_network(("sha", model_cache.MAX_MODELS + 1), lambda: made.append("no"))
    assert made == [*range(model_cache.MAX_MODELS + 2), "again"]


class _Tied(torch.nn.Module):
    """One submodule used twice and a plain tensor attribute: deepcopy keeps the tie."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.b = self.a
        self.scale = torch.ones(3)


class _Custom(torch.nn.Linear):
    def __deepcopy__(self, memo):
        copied = torch.nn.Linear(self.in_features, self.out_features)
        copied.load_state_dict(self.state_dict())
        copied.custom_copy = True
        return copied


def test_fresh_copy_matches_deepcopy_and_shares_nothing():
    from gauntlet.workers.architectures import build_architecture
    from gauntlet.workers.models import InputSpec, Normalized

    spec = InputSpec(3, 32, 32, 10)
    net = Normalized(build_architecture("preact-resnet18", spec), spec).eval()
    net.net.register_forward_hook(lambda *args: None)  # a hook the template carries
    copied = model_cache.fresh_copy(net)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(copied(x), net(x))
    assert [type(m) for m in copied.modules()] == [type(m) for m in net.modules()]
    assert len(copied.net._forward_hooks) == 1
    for a, b in zip(net.state_dict().values(), copied.state_dict().values(), strict=True):
        assert a.data_ptr() != b.data_ptr()
    copied.net.register_forward_hook(lambda *args: None)
    assert len(net.net._forward_hooks) == 1  # the template's tables are its own
    copied.train()
    assert not net.training and not net.net.training

    original = _Tied()
    tied = model_cache.fresh_copy(original)
    assert tied.a is tied.b and tied.a is not original.a
    assert torch.equal(tied.scale, original.scale) and tied.scale is not original.scale
    custom = model_cache.fresh_copy(torch.nn.Sequential(_Custom(2, 2)))
    assert getattr(custom[0], "custom_copy", False)  # its own __deepcopy__ was used

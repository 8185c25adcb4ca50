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

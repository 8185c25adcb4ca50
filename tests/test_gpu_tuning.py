"""GPU tuning rules that hold on any machine: the batch-size arithmetic and CPU behaviour."""

from __future__ import annotations

import torch

from gauntlet.workers import gpu
from gauntlet.workers.context import JobContext


def test_batch_fills_the_stated_share_of_free_memory_in_multiples_of_32():
    mib = 1024**2
    # 10 GiB free, 1 MiB per example: 0.6 * 10240 = 6144 examples, a multiple of 32.
    assert gpu.batch_for_memory(mib, 10 * 1024 * mib, floor=64, cap=100_000) == 6144
    # Rounded down to a multiple of 32: 0.6 * 1000 / 3 = 200 -> 192.
    assert gpu.batch_for_memory(3 * mib, 1000 * mib, floor=16, cap=10_000) == 192
    # Never above the points there are, nor below the spec's own batch size.
    assert gpu.batch_for_memory(mib, 10 * 1024 * mib, floor=64, cap=500) == 500
    assert gpu.batch_for_memory(512 * mib, 1024 * mib, floor=64, cap=10_000) == 64
    assert gpu.batch_for_memory(1, 10**15, floor=1, cap=10**9) == gpu.MAX_BATCH


def test_on_a_cpu_the_spec_batch_size_and_the_plain_layout_are_kept(stored):
    model, store = stored
    spec = {"dataset": "digits", "seed": 0, "n": 450, "attack": "clean", "batch_size": 48}
    ctx = JobContext(spec, model, store, "", device_label="cpu")
    ctx.device = torch.device("cpu")
    assert ctx.batch_size == 48
    net = ctx.net
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous()  # channels-last only on CUDA
    assert gpu.auto_batch_size(net, (1, 8, 8), torch.device("cpu"), floor=48, cap=450) == 48

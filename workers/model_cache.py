"""Networks a worker process loaded, kept for its next jobs, keyed by content.

Loading a network means reading its file, checking its sha256 and building the
architecture: for a small job that costs more than the job itself. A worker process
keeps the last few networks it built, keyed by (weights sha256, architecture, input
spec, device), so the same content always maps to the same network, and hands each job
its own deep copy: a job may register hooks, fine-tune or wrap the network, and none of
that may leak into the next job.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Callable

import torch

# A few models: a worker alternates between a handful (a transfer job's surrogates, a
# nightly run's models); more would hold GPU memory the jobs need.
MAX_MODELS = 4

_networks: OrderedDict[tuple, torch.nn.Module] = OrderedDict()


def network_key(row: dict, device: torch.device) -> tuple:
    spec = json.dumps(row["input_spec"], sort_keys=True, default=str)
    return (row["weights_sha256"], row["arch"], spec, str(device))


def cached_network(key: tuple, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A fresh copy of the network under ``key``, loading it on the first request."""
    template = _networks.get(key)
    if template is None:
        template = load()
        _networks[key] = template
        while len(_networks) > MAX_MODELS:
            _networks.popitem(last=False)
    else:
        _networks.move_to_end(key)
    return copy.deepcopy(template)


def clear() -> None:
    _networks.clear()

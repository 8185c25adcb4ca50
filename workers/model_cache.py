"""Networks a worker process loaded, kept for its next jobs, keyed by content.

Loading a network means reading its file, checking its sha256 and building the
architecture: for a small job that costs more than the job itself. A worker process
keeps the last few networks it built, keyed by (weights sha256, architecture, input
spec, device), so the same content always maps to the same network, and hands each job
its own deep copy: a job may register hooks, fine-tune or wrap the network, and none of
that may leak into the next job.

The copy is ``copy.deepcopy``'s, less its cost on the dozen empty hook dictionaries every
module carries: on a small network those are most of the objects deepcopy reconstructs,
and the copy cost more than the small job it served.
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
    return fresh_copy(template)


def _plain_module(module: torch.nn.Module) -> bool:
    """A module that deepcopy would copy through its ``__dict__`` (nothing custom)."""
    cls = type(module)
    return (
        not hasattr(cls, "__deepcopy__")
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__getstate__ is torch.nn.Module.__getstate__
        and cls.__setstate__ is torch.nn.Module.__setstate__
        and not hasattr(cls, "__slots__")
    )


def fresh_copy(module: torch.nn.Module, memo: dict | None = None) -> torch.nn.Module:
    """What ``copy.deepcopy(module)`` returns: no tensor, hook or submodule shared."""
    memo = {} if memo is None else memo
    found = memo.get(id(module))
    if found is not None:
        return found  # a submodule used twice stays one module, as deepcopy keeps it
    if not _plain_module(module):
        return copy.deepcopy(module, memo)
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = type(value)(
                (name, None if child is None else fresh_copy(child, memo))
                for name, child in value.items()
            )
        elif type(value) in (dict, OrderedDict) and not value:
            state[key] = type(value)()  # an empty hook table: nothing to copy but itself
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def clear() -> None:
    _networks.clear()

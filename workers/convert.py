"""``gauntlet convert``: a PyTorch checkpoint -> the safetensors file ``submit`` takes.

This runs on the submitter's machine, on the submitter's own file: the service itself
never reads a pickle. Even here the checkpoint is opened with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only
and refuses any other object, so a checkpoint from elsewhere cannot run code.

Checkpoints come wrapped in many ways: a bare state dict, ``{"state_dict": ...}``,
``{"model": ...}`` or ``{"net": ...}`` (with optimiser state beside it), and keys
prefixed ``module.`` by DataParallel. RobustBench's WideResNet and PreAct ResNet use
their own module names; ``robustbench_to_ours`` renames them onto ours, which compute
the same function (pre-activation blocks whose projection shortcut sees the
pre-activated input).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from gauntlet.cluster.errors import GauntletError

CONTAINERS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")

# RobustBench WideResNet -> ours: block<i>.layer.<j>.* -> block<i>.<j>.*, convShortcut ->
# shortcut, and the final batch norm bn1 -> bn. PreAct ResNet: shortcut.0 -> shortcut
# (RobustBench wraps the projection in a Sequential; ours is the bare conv). Each rule is
# applied in turn; each family's list is anchored so that no two rules touch one name.
_WRN_RULES = (
    (r"^(block\d+)\.layer\.(\d+)\.convShortcut\.", r"\1.\2.shortcut."),
    (r"^(block\d+)\.layer\.(\d+)\.", r"\1.\2."),
    (r"^bn1\.", "bn."),
)
_WRN_INVERSE = (
    (r"^(block\d+)\.(\d+)\.shortcut\.", r"\1.layer.\2.convShortcut."),
    (r"^(block\d+)\.(\d+)\.", r"\1.layer.\2."),
    (r"^bn\.", "bn1."),
)
_PREACT_RULES = ((r"^(layer\d+\.\d+)\.shortcut\.0\.", r"\1.shortcut."),)
_PREACT_INVERSE = ((r"^(layer\d+\.\d+)\.shortcut\.", r"\1.shortcut.0."),)


def _rules(arch: str, inverse: bool) -> tuple:
    if arch.startswith("wrn-"):
        return _WRN_INVERSE if inverse else _WRN_RULES
    if arch == "preact-resnet18":
        return _PREACT_INVERSE if inverse else _PREACT_RULES
    return ()


def _rename(state: Mapping[str, torch.Tensor], rules) -> dict:
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def robustbench_to_ours(state: Mapping[str, torch.Tensor], arch: str) -> dict:
    """RobustBench key names onto ours, for wrn-* and preact-resnet18; others unchanged."""
    return _rename(state, _rules(arch, inverse=False))


def ours_to_robustbench(state: Mapping[str, torch.Tensor], arch: str) -> dict:
    """The inverse map: our state dict under RobustBench's names (tests build one)."""
    return _rename(state, _rules(arch, inverse=True))


def unwrap(checkpoint) -> dict:
    """The state dict inside a checkpoint: containers opened, wrapper prefixes stripped."""
    state = checkpoint
    for _ in range(3):  # {"model": {"state_dict": ...}} happens
        if not isinstance(state, Mapping):
            break
        inner = next((state[k] for k in CONTAINERS if isinstance(state.get(k), Mapping)), None)
        if inner is None or _is_state_dict(state):
            break
        state = inner
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise GauntletError(
            "the checkpoint holds no state dict (a mapping of names to tensors), neither "
            f"at the top nor under {', '.join(repr(k) for k in CONTAINERS)}"
        )
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _is_state_dict(value: Mapping) -> bool:
    return bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def convert_checkpoint(
    checkpoint: str | os.PathLike, arch: str, out: str | os.PathLike | None = None, spec=None
) -> tuple[Path, list[str]]:
    """Write ``checkpoint``'s weights for ``arch`` as safetensors; (path, renamed keys).

    The result is loaded into ``arch`` strictly before it is written (with ``spec``, or
    the spec inferred as CIFAR-10's), so a file that ``submit`` would refuse for missing
    or unexpected keys is refused here, where the checkpoint can still be fixed.
    """
    from gauntlet.workers.architectures import build_architecture
    from gauntlet.workers.models import InputSpec, _check_state_dict, save_classifier

    source = Path(checkpoint)
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GauntletError(f"checkpoint {str(source)!r} does not exist") from None
    except Exception as exc:  # weights_only refuses arbitrary objects with its own errors
        raise GauntletError(
            f"cannot load checkpoint {str(source)!r} with weights_only=True (tensors and "
            f"plain containers only): {exc}"
        ) from None
    state = unwrap(loaded)
    mapped = robustbench_to_ours(state, arch)
    renamed = sorted(k for k in state if k not in mapped)
    if spec is None:
        spec = _guess_spec(mapped, arch) or InputSpec(3, 32, 32, 10)
    net = build_architecture(arch, spec)
    _check_state_dict(arch, mapped, net.state_dict())
    net.load_state_dict(mapped, strict=True)
    target = Path(out) if out is not None else source.with_suffix(".safetensors")
    save_classifier(net, target)
    return target, renamed


def _guess_spec(state: dict, arch: str):
    """Channels and classes from the stem and the head, for the strict load check."""
    from gauntlet.workers.models import InputSpec

    stem = next((v for k, v in state.items() if v.dim() == 4), None)
    head = [v for k, v in state.items() if v.dim() == 2]
    if stem is None or not head:
        return None
    return InputSpec(int(stem.shape[1]), 32, 32, int(head[-1].shape[0]))

"""Loading submitted classifiers: input spec, safetensors checks, pixel-space wrapper.

A submission is bare safetensors weights plus a registered architecture name plus an
InputSpec. We never unpickle anything a user sent: ``check_safetensors`` reads only the
length-prefixed JSON header and refuses pickles and torch.save zips by their first
bytes, before any library parses the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.architectures import build_architecture

# safetensors itself refuses headers above 100 MB; anything larger is not a header.
_MAX_HEADER = 100_000_000
_ZIP_MAGIC = b"PK\x03\x04"
# First bytes of pickles: PROTO (protocol 2+), and the usual openers of protocol 0/1
# streams (MARK, GLOBAL, EMPTY_DICT/LIST/TUPLE, LONG, INT, STRING, UNICODE).
_PICKLE_FIRST = set(b"\x80(c}])LISVN")
_CONVERT = (
    "gauntlet only reads safetensors: convert it with "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
# safetensors' dtype codes under torch's names. Floating-point weights in any of these are
# converted to float32 on load (attacks and defenses assume float32 gradients); integer
# weights are quantised models, which this loader cannot run, and are refused instead.
_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
_FLOATS = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


@dataclass(frozen=True)
class InputSpec:
    """What a classifier takes: image shape, classes, and its own normalisation."""

    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...] = (0.0,)  # per channel, or one value broadcast
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        # Lists (from JSON) or a bare number become tuples so the spec stays hashable.
        for field in ("mean", "std"):
            value = getattr(self, field)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                object.__setattr__(self, field, (float(value),))
            elif isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        self.validate()

    def validate(self) -> None:
        for field in ("channels", "height", "width", "num_classes"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GauntletError(f"Expected `{field}` to be a positive int, but got {value!r}")
        if self.num_classes < 2:
            raise GauntletError(
                f"Expected `num_classes` to be at least 2, but got {self.num_classes}"
            )
        for field in ("mean", "std"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or len(value) not in (1, self.channels):
                raise GauntletError(
                    f"Expected `{field}` to hold 1 or {self.channels} (channels) numbers, "
                    f"but got {value!r}"
                )
            for v in value:
                ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                if not ok or (field == "std" and v <= 0):
                    kind = "positive finite numbers" if field == "std" else "finite numbers"
                    raise GauntletError(f"Expected `{field}` to be {kind}, but got {value!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = [float(v) for v in self.mean], [float(v) for v in self.std]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        if not isinstance(d, dict):
            raise GauntletError(f"Expected the input spec to be a mapping, but got {d!r}")
        required = {"channels", "height", "width", "num_classes"}
        allowed = required | {"mean", "std"}
        if missing := sorted(required - d.keys()):
            raise GauntletError(f"input spec is missing {', '.join(missing)}")
        if unknown := sorted(set(d) - allowed):
            raise GauntletError(
                f"input spec has unknown keys {', '.join(map(str, unknown))}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        return cls(**d)


class Normalized(nn.Module):
    """``forward(x in [0, 1]) = net((x - mean) / std)``: attacks work in pixel space."""

    def __init__(self, net: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        # Buffers follow .to(device) and are not in the submitted weights (net's are).
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate the header of a safetensors file without trusting it; return tensor entries."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw = f.read(n) if 0 < n <= min(_MAX_HEADER, size - 8) else b""
    except OSError as exc:
        raise GauntletError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    if head.startswith(_ZIP_MAGIC):
        raise GauntletError(f"{path} looks like a zip/torch.save checkpoint; {_CONVERT}")
    if size < 8:
        raise GauntletError(f"{path} is empty or too short ({size} bytes) to be safetensors")
    header = _parse_header(raw) if raw else None
    if header is None:
        # Only now guess at what it is: a valid header could begin with any length byte.
        if head[0] in _PICKLE_FIRST:
            raise GauntletError(f"{path} looks like a pickle/torch.save checkpoint; {_CONVERT}")
        if n > _MAX_HEADER or n > size - 8:
            raise GauntletError(
                f"{path} is not a safetensors file: its header length {n} is absurd for a "
                f"{size}-byte file (truncated or another format)"
            )
        raise GauntletError(f"{path} is not a safetensors file: its header is not a JSON object")
    data_size = size - 8 - n
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):  # the format allows only a flat string-to-string map here
        raise GauntletError(
            f"{path} is not a valid safetensors file: its __metadata__ is not a mapping of strings"
        )
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in tensors.items():
        _check_entry(path, name, entry, data_size)
    return tensors


def _parse_header(raw: bytes) -> dict | None:
    if not raw.startswith(b"{"):  # the format requires the header to open with '{'
        return None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    except RecursionError:
        # A real header nests three levels deep (header, tensor entry, shape list); one
        # nested thousands of levels deep exists only to exhaust the JSON parser's stack.
        raise GauntletError(
            "the weights file is not a safetensors file: its JSON header nests too deeply"
        ) from None
    return header if isinstance(header, dict) else None


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    bad = f"{path} is not a valid safetensors file: tensor {name!r} has"
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise GauntletError(f"{bad} no dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise GauntletError(f"{bad} an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise GauntletError(f"{bad} invalid data offsets {offsets!r}")
    if offsets[1] > data_size:
        raise GauntletError(
            f"{path} is truncated: tensor {name!r} ends at byte {offsets[1]} of the data "
            f"section, but the file holds only {data_size}; upload the complete file"
        )
    itemsize = _DTYPE_BYTES.get(entry["dtype"])
    if itemsize is None:
        raise GauntletError(f"{bad} dtype {entry['dtype']!r}, which gauntlet cannot read")
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise GauntletError(f"{bad} {offsets[1] - offsets[0]} bytes for shape {tuple(shape)}")


def load_classifier(
    path: str | os.PathLike, arch: str, spec: InputSpec, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build ``arch`` for ``spec``, load the weights strictly, wrap in Normalized, freeze.

    An ``onnx`` model's file is its graph: it is checked and converted instead.
    """
    from gauntlet.workers import onnx_models

    if arch == onnx_models.ARCH:
        net = onnx_models.load_onnx(path)
        onnx_models.forward_check(net, (1, spec.channels, spec.height, spec.width))
    else:
        net = _load_net(path, arch, spec)
    model = Normalized(net, spec).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _check_forward(model, arch, spec, device)
    return model


def _load_net(path: str | os.PathLike, arch: str, spec: InputSpec) -> nn.Module:
    from safetensors.torch import load_file

    check_safetensors(path)
    net = build_architecture(arch, spec)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise GauntletError(f"cannot read weights file {path}: {exc}") from exc
    expected = net.state_dict()
    _check_state_dict(arch, state, expected)
    dtype_note(arch, {k: _dtype_name(v.dtype) for k, v in state.items()}, expected)
    # Explicit, so that the float32 rule does not hang on load_state_dict's implicit copy.
    state = {k: _as_expected(v, expected[k]) for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise GauntletError(f"weights do not match architecture '{arch}': {exc}") from exc
    return net


def header_dtypes(tensors: dict) -> dict[str, str]:
    """Each tensor's dtype under torch's name, from ``check_safetensors``' entries."""
    return {name: _TORCH_DTYPES[entry["dtype"]] for name, entry in tensors.items()}


def dtype_note(arch: str, dtypes: dict[str, str], expected: dict) -> str | None:
    """Refuse integer weights where the network has floats; the note on any conversion.

    ``dtypes`` maps tensor names to the file's dtypes (torch's names), ``expected`` is
    the network's state_dict. Integer buffers (batch norm's ``num_batches_tracked``)
    stay integers; names the network lacks are left to the state-dict check.
    """
    converted = set()
    for name, dtype in sorted(dtypes.items()):
        want = expected.get(name)
        if want is None or not want.is_floating_point():
            continue
        if dtype not in _FLOATS:
            raise GauntletError(
                f"weights for '{arch}' hold tensor {name!r} as {dtype}: gauntlet takes "
                "floating-point weights (float32, or float16, bfloat16 and float64, which "
                "it converts to float32); integer (quantised) weights are not supported"
            )
        if dtype != _dtype_name(want.dtype):
            converted.add(dtype)
    if not converted:
        return None
    return f"weights converted from {', '.join(sorted(converted))} to float32"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_expected(tensor: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    if want.is_floating_point() and tensor.dtype != want.dtype:
        return tensor.to(want.dtype)
    return tensor


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_state_dict(arch: str, state: dict, expected: dict) -> None:
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"missing keys {_names(missing)}")
    if unexpected := sorted(state.keys() - expected.keys()):
        problems.append(f"unexpected keys {_names(unexpected)}")
    for key in sorted(expected.keys() & state.keys()):
        file_shape, model_shape = tuple(state[key].shape), tuple(expected[key].shape)
        if file_shape != model_shape:
            problems.append(f"shape mismatch for {key}: file {file_shape} vs model {model_shape}")
    if problems:
        raise GauntletError(
            f"weights do not match architecture '{arch}': {'; '.join(problems)}; "
            "check the architecture name and the input spec (channels, num_classes)"
        )


def _check_forward(model: nn.Module, arch: str, spec: InputSpec, device) -> None:
    shape = (1, spec.channels, spec.height, spec.width)
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device))
    except Exception as exc:  # any failure here means arch and spec do not fit together
        raise GauntletError(
            f"architecture '{arch}' fails on an input of shape {shape}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, spec.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise GauntletError(
            f"architecture '{arch}' should give logits of shape (1, {spec.num_classes}) "
            f"for an input of shape {shape}, but gave {got}"
        )
    if not torch.isfinite(out).all():
        raise GauntletError(f"weights for '{arch}' give non-finite logits (NaN or inf weights?)")


def save_classifier(net: nn.Module, path: str | os.PathLike) -> str:
    """Write the bare net's state_dict as safetensors; return the file's sha256 hex."""
    from safetensors.torch import save_file

    if isinstance(net, Normalized):
        net = net.net  # normalisation lives in the spec, not in the weights
    # clone(): safetensors refuses tensors that share storage (tied or viewed weights).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Backdoor triggers: what an attacker stamps on an image to fire the backdoor.

The BadNets triggers of Gu et al. 2017 (arXiv 1708.06733): a single bright pixel, a small
pattern and a solid square, pasted at a fixed place (the paper's MNIST attacks use the
bottom-right corner), plus the blended trigger of Chen et al. 2017 (arXiv 1712.05526):
``(1 - alpha) * x + alpha * pattern``, invisible at small alpha.

Each trigger is a small frozen dataclass built from plain JSON-able parameters
(``build_trigger(kind, params)``), so a job spec can name it and a result can record it
(``trigger.to_params()``). ``stamp`` works on (n, C, H, W) images in [0, 1] of any size
and channel count; the defaults fit 8x8 digits (a 2x2 square, a 3x3 checker).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.backdoor._checks import (
    expect_float,
    expect_images,
    expect_int,
    expect_unit_values,
)

# Where a patch goes: a named place (with ``margin`` pixels from the named edges) or the
# explicit [row, col] of its top-left pixel.
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "centre")

CHECKER_3X3 = ((1.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0))


def _check_position(value: Any) -> str | tuple[int, int]:
    if isinstance(value, str):
        if value not in POSITIONS:
            raise GauntletError(
                f"Expected `position` to be one of {', '.join(POSITIONS)} or [row, col], "
                f"but got {value!r}"
            )
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        row, col = value
        return (expect_int("position row", row, 0), expect_int("position col", col, 0))
    raise GauntletError(
        f"Expected `position` to be one of {', '.join(POSITIONS)} or [row, col], but got {value!r}"
    )


def _place(
    position: str | tuple[int, int], margin: int, size: tuple[int, int], image: tuple[int, int]
) -> tuple[int, int]:
    """Top-left (row, col) of a patch of ``size`` in an image of ``image`` (both (h, w))."""
    (ph, pw), (h, w) = size, image
    if isinstance(position, tuple):
        row, col = position
    else:
        vertical, _, horizontal = position.partition("-")
        row = {"top": margin, "bottom": h - ph - margin}.get(vertical, (h - ph) // 2)
        col = {"left": margin, "right": w - pw - margin}.get(horizontal, (w - pw) // 2)
    if row < 0 or col < 0 or row + ph > h or col + pw > w:
        raise GauntletError(
            f"a {ph}x{pw} trigger at {position!r} (margin {margin}) does not fit inside a "
            f"{h}x{w} image; use a smaller trigger, margin or another position"
        )
    return row, col


def _channel_values(colour: tuple[float, ...], channels: int, like: torch.Tensor) -> torch.Tensor:
    """The colour as a (C, 1, 1) tensor: one value for every channel, or one per channel."""
    if len(colour) not in (1, channels):
        raise GauntletError(
            f"Expected `colour` to hold 1 or {channels} (channels) values, but got {colour}"
        )
    values = torch.tensor(colour, dtype=like.dtype, device=like.device)
    return values.expand(channels).view(channels, 1, 1)


def _paste(
    x: torch.Tensor,
    patch: torch.Tensor,
    position: str | tuple[int, int],
    margin: int,
) -> torch.Tensor:
    """A copy of x with the (C, ph, pw) patch overwriting its place in every image."""
    row, col = _place(position, margin, tuple(patch.shape[1:]), tuple(x.shape[2:]))
    out = x.clone()
    out[:, :, row : row + patch.shape[1], col : col + patch.shape[2]] = patch
    return out


class Trigger:
    """Base of the triggers: ``stamp`` images, and name the parameters as JSON."""

    kind: ClassVar[str]

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """A triggered copy of ``x`` (n, C, H, W) in [0, 1]; ``x`` itself is not changed."""
        x = expect_images("x", x)
        return self._stamp(x).clamp(0.0, 1.0)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_params(self) -> dict[str, Any]:
        """The parameters as JSON-able values: ``build_trigger(kind, to_params())`` rebuilds it."""

        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return {k: plain(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class PatternTrigger(Trigger):
    """A small pattern (a 3x3 checker by default) overwriting a patch of the image.

    The patch pixel (i, j) of channel c becomes ``pattern[i][j] * colour[c]``: the whole
    patch is written, zeros included, so the trigger looks the same on any background.
    """

    kind: ClassVar[str] = "pattern"
    pattern: tuple[tuple[float, ...], ...] = CHECKER_3X3
    position: str | tuple[int, int] = "bottom-right"
    margin: int = 0
    colour: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        rows = self.pattern
        if (
            not isinstance(rows, (list, tuple))
            or not rows
            or not all(isinstance(r, (list, tuple)) and r for r in rows)
            or len({len(r) for r in rows}) != 1
        ):
            raise GauntletError(
                f"Expected `pattern` to be a non-empty rectangular list of rows of values in "
                f"[0, 1], but got {rows!r}"
            )
        pattern = tuple(expect_unit_values("pattern", list(r)) for r in rows)
        object.__setattr__(self, "pattern", pattern)
        _init_placement(self)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        values = torch.tensor(self.pattern, dtype=x.dtype, device=x.device)
        patch = values.unsqueeze(0) * _channel_values(self.colour, x.shape[1], x)
        return _paste(x, patch, self.position, self.margin)


@dataclass(frozen=True)
class SquareTrigger(Trigger):
    """A solid ``size`` x ``size`` square of ``colour`` (BadNets' white square)."""

    kind: ClassVar[str] = "square"
    size: int = 2
    position: str | tuple[int, int] = "bottom-right"
    margin: int = 0
    colour: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", expect_int("size", self.size, 1))
        _init_placement(self)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        colour = _channel_values(self.colour, x.shape[1], x)
        patch = colour.expand(x.shape[1], self.size, self.size)
        return _paste(x, patch, self.position, self.margin)


@dataclass(frozen=True)
class PixelTrigger(Trigger):
    """One pixel set to ``colour`` (BadNets' single-pixel backdoor)."""

    kind: ClassVar[str] = "pixel"
    position: str | tuple[int, int] = "bottom-right"
    margin: int = 0
    colour: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        _init_placement(self)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        patch = _channel_values(self.colour, x.shape[1], x)
        return _paste(x, patch, self.position, self.margin)


@dataclass(frozen=True)
class BlendTrigger(Trigger):
    """``(1 - alpha) * x + alpha * pattern`` over the whole image (Chen et al. 2017).

    The pattern is ``image`` when given (H x W, broadcast over channels, or C x H x W),
    else uniform noise in [0, 1] drawn from numpy's generator seeded with ``seed``: a
    pure function of (seed, image shape), the same on every machine.
    """

    kind: ClassVar[str] = "blend"
    alpha: float = 0.2
    seed: int = 0
    image: tuple | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", expect_float("alpha", self.alpha, 0.0, 1.0))
        object.__setattr__(self, "seed", expect_int("seed", self.seed, 0))
        if self.image is not None:
            try:
                array = np.asarray(self.image, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise GauntletError(
                    f"Expected `image` to be a nested list of values in [0, 1]: {exc}"
                ) from exc
            if array.ndim not in (2, 3) or array.size == 0:
                raise GauntletError(
                    f"Expected `image` to be H x W or C x H x W, but got shape {array.shape}"
                )
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise GauntletError("Expected `image` to hold values in [0, 1]")
            object.__setattr__(self, "image", _nested_tuple(array))

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The (C, H, W) pattern blended into images of ``shape``."""
        channels, h, w = shape
        if self.image is None:
            noise = np.random.default_rng(self.seed).random((channels, h, w))
            return torch.from_numpy(noise).float()
        image = torch.tensor(self.image, dtype=torch.float32)
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if tuple(image.shape[1:]) != (h, w) or image.shape[0] not in (1, channels):
            raise GauntletError(
                f"the blend image has shape {tuple(image.shape)}, but the images are "
                f"{channels}x{h}x{w}; give an H x W or C x H x W image of their size"
            )
        return image.expand(channels, h, w)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
        return (1 - self.alpha) * x + self.alpha * pattern


def _nested_tuple(array: np.ndarray) -> tuple:
    if array.ndim == 1:
        return tuple(float(v) for v in array)
    return tuple(_nested_tuple(row) for row in array)


def _init_placement(trigger: Trigger) -> None:
    """Validate and normalise position, margin and colour (lists from JSON -> tuples)."""
    object.__setattr__(trigger, "position", _check_position(trigger.position))
    object.__setattr__(trigger, "margin", expect_int("margin", trigger.margin, 0))
    object.__setattr__(trigger, "colour", expect_unit_values("colour", trigger.colour))


def expect_trigger(name: str, trigger: Any) -> Trigger:
    """``trigger`` if it is a Trigger (as ``build_trigger`` makes), else GauntletError."""
    if not isinstance(trigger, Trigger):
        raise GauntletError(
            f"Expected `{name}` to be a trigger (see build_trigger), but got {trigger!r}"
        )
    return trigger


TRIGGERS: dict[str, type[Trigger]] = {
    cls.kind: cls for cls in (PixelTrigger, PatternTrigger, SquareTrigger, BlendTrigger)
}


def build_trigger(kind: str, params: dict[str, Any] | None = None) -> Trigger:
    """The trigger ``kind`` (pixel, pattern, square, blend) with ``params`` over defaults."""
    if kind not in TRIGGERS:
        raise GauntletError(f"unknown trigger kind {kind!r}; known: {', '.join(TRIGGERS)}")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise GauntletError(f"Expected trigger params to be a mapping, but got {params!r}")
    cls = TRIGGERS[kind]
    accepted = [f.name for f in fields(cls)]
    unknown = sorted(map(str, set(params) - set(accepted)))
    if unknown:
        raise GauntletError(
            f"unknown parameter(s) {', '.join(unknown)} for the {kind} trigger; "
            f"accepted: {', '.join(accepted)}"
        )
    return cls(**params)

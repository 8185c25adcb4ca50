"""Attribution maps for a classifier: LIME on superpixels, gradient saliency, IG.

Each method answers "which pixels made the model say this class" for a batch of
inputs, as a map of the inputs' shape (n, C, H, W):

- ``saliency``: the plain gradient of the class logit w.r.t. the input (Simonyan et al.
  2014), signed; summaries and comparisons use its absolute value.
- ``ig``: integrated gradients from a black baseline (Sundararajan et al. 2017).
- ``lime``: a local linear surrogate over SLIC superpixels (Ribeiro et al. 2016); every
  pixel of a superpixel carries that superpixel's weight.

The explained class is the model's own prediction on each input, so an adversarial
input is explained for the wrong class it was pushed into. The job and the tests share
this module: the sanity check of Adebayo et al. (2018) has to test the code that
produces the stored maps, not a copy of it.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from scipy.stats import rankdata

METHODS = ("lime", "saliency", "ig")

DEFAULTS = {
    "segments": 16,  # SLIC superpixels per image (LIME's features)
    "lime_samples": 200,  # perturbed copies LIME fits its surrogate on
    "ig_steps": 32,  # Riemann steps of the path integral
}


def superpixels(x: torch.Tensor, segments: int) -> torch.Tensor:
    """SLIC segment ids per image, (n, 1, H, W) int64, numbered from 0.

    Grey images go in as 2-D arrays (no channel axis): SLIC would otherwise read the
    single channel as a colour image and convert it to Lab.
    """
    from skimage.segmentation import slic

    masks = []
    for image in x.detach().cpu().numpy():
        if image.shape[0] == 1:
            # Intensities lie in [0, 1]: a compactness of 10 (made for Lab's 0-100 range)
            # would drown them and give a plain grid.
            seg = slic(image[0], n_segments=segments, compactness=0.1, channel_axis=None)
        else:
            seg = slic(image.transpose(1, 2, 0), n_segments=segments, channel_axis=-1)
        # Renumber from 0 so the ids are exactly LIME's interpretable features.
        _, seg = np.unique(seg, return_inverse=True)
        masks.append(seg.reshape(image.shape[1:]))
    return torch.as_tensor(np.stack(masks), dtype=torch.int64).unsqueeze(1).to(x.device)


def predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def attribute(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    method: str,
    settings: dict | None = None,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """``method``'s attribution of class ``target[i]`` to each pixel of ``x[i]``."""
    from captum.attr import IntegratedGradients, Saliency

    s = DEFAULTS | (settings or {})
    # A leaf that asks for its gradient: the maps are gradients w.r.t. the input.
    x = x.detach().clone().requires_grad_(True)
    target = target.to(x.device)
    if method == "saliency":
        return Saliency(model).attribute(x, target=target, abs=False).detach()
    if method == "ig":
        ig = IntegratedGradients(model)
        maps = ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=s["ig_steps"])
        return maps.detach()
    if method == "lime":
        return _lime(model, x, target, s, seed)
    raise ValueError(f"unknown explanation method {method!r}; known: {', '.join(METHODS)}")


def _lime(model, x, target, s: dict, seed: int) -> torch.Tensor:
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    masks = superpixels(x, s["segments"])
    # Ridge, not captum's default Lasso: on a few superpixels the Lasso often sets every
    # weight to zero, which explains nothing.
    lime = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0))
    maps = []
    # One image at a time: each has its own superpixels, and a per-image seed makes the
    # perturbations the same whatever the batch.
    for i in range(len(x)):
        torch.manual_seed(seed * 1_000_003 + i)
        mask = masks[i : i + 1].expand_as(x[i : i + 1])
        maps.append(
            lime.attribute(
                x[i : i + 1],
                target=int(target[i]),
                feature_mask=mask,
                n_samples=s["lime_samples"],
                perturbations_per_eval=50,
            ).detach()
        )
    return torch.cat(maps)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of |a[i]| and |b[i]| per example, (n,).

    Absolute values, as in Adebayo et al.: a gradient's sign flips with the direction of
    the logit's slope, its magnitude is what says which pixels matter. A constant map
    (all zero: nothing attributed) correlates with nothing, so it scores 0.
    """
    out = []
    for u, v in zip(
        a.abs().flatten(1).cpu().numpy(), b.abs().flatten(1).cpu().numpy(), strict=True
    ):
        ru, rv = rankdata(u), rankdata(v)
        ru, rv = ru - ru.mean(), rv - rv.mean()
        denom = float(np.sqrt((ru * ru).sum() * (rv * rv).sum()))
        out.append(float((ru * rv).sum()) / denom if denom > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def mean_abs(maps: torch.Tensor) -> float:
    return float(maps.abs().mean()) if maps.numel() else 0.0


def save_maps(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors as safetensors bytes: data only, loadable without running any code."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def load_maps(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _heat(maps: torch.Tensor) -> np.ndarray:
    """(n, H, W): the channels' summed attribution, for one colour scale per image."""
    return maps.detach().sum(1).cpu().numpy()


def _image(x: torch.Tensor) -> np.ndarray:
    array = x.detach().cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def grid_png(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    *,
    title: str,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> bytes:
    """One row per point: input, its map, adversarial input, its map (red +, blue -)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    n = len(x)
    fig, axes = plt.subplots(n, 4, figsize=(6.4, 1.6 * n + 0.4), squeeze=False)
    heats = (_heat(clean), _heat(adversarial))
    for i in range(n):
        row = axes[i]
        for col, (img, heat) in enumerate(((x[i], heats[0][i]), (x_adv[i], heats[1][i]))):
            grey = img.shape[0] == 1
            row[2 * col].imshow(_image(img), cmap="gray" if grey else None, vmin=0, vmax=1)
            scale = float(np.abs(heat).max()) or 1.0
            row[2 * col + 1].imshow(heat, cmap="bwr", vmin=-scale, vmax=scale)
            if labels is not None:
                row[2 * col].set_title(f"class {int(labels[col][i])}", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], ("clean", "map", "adversarial", "map"), strict=True):
        ax.set_xlabel(name, fontsize=7)
        ax.xaxis.set_label_position("top")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()

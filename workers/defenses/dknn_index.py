"""Deep k-Nearest Neighbors (Papernot & McDaniel 2018): conformal credibility per input.

Every chosen layer of a trained classifier indexes the training set; a test input's
neighbours in each layer vote. The nonconformity of label ``j`` is the number of
neighbours, summed over layers, whose label is not ``j``. A held-out calibration split
turns nonconformity into p-values: ``p_j(x)`` is the fraction of calibration points whose
(true-label) nonconformity is at least ``alpha(x, j)``. Credibility (the largest p-value)
is low when the layers disagree with each other, which is what adversarial inputs tend to
cause even when the final prediction is confidently wrong.

Layers are chosen by module path, never by hooking a module object the network calls
more than once (torchvision's BasicBlock applies one ``relu`` twice): the output of each
residual stage and the penultimate representation. Feature maps larger than 4x4 are
average-pooled to 4x4, so the index of a CIFAR-sized WRN fits in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError

DEFAULT_K = 75
DEFAULT_CALIBRATION = 750
# Queries per torch.cdist call: bounds memory at chunk * n_train floats per layer.
_CHUNK = 512
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Residual stages by their conventional names: torchvision and timm ResNets (layer1..4),
# our PreAct-ResNet (layer1..4) and WideResNet (block1..3).
_STAGE = re.compile(r"^(layer|block|stage)\d+$")
# Spatial side a feature map is pooled down to: 16 positions keep some layout while a
# 640-channel WRN stage stays at 10,240 values per indexed point.
_GRID = 4

Layer = str | nn.Module


def _bare(model: nn.Module) -> nn.Module:
    """The network whose submodules name the layers (``Normalized`` keeps it in ``.net``)."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def default_layers(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, read_input) pairs: the residual stages' outputs, then the penultimate layer.

    A network with children named ``layer<i>``/``block<i>``/``stage<i>`` (ResNets, WRN,
    PreAct-ResNet) gives each of them. Otherwise the post-activation feature maps:
    ``nn.ReLU`` modules when the network has them; networks that call ``torch.relu``
    functionally (like ``small-cnn``) have none, so the pooling layers that directly
    follow each activation stand in for them. The input of the last ``nn.Linear`` is the
    flattened penultimate representation.
    """
    net = _bare(model)
    modules = list(net.modules())
    stages = [m for name, m in net.named_children() if _STAGE.match(name)]
    chosen: list[tuple[nn.Module, bool]] = [(m, False) for m in stages]
    if not chosen:
        chosen = [(m, False) for m in modules if isinstance(m, nn.ReLU)]
    if not chosen:
        chosen = [(m, False) for m in modules if isinstance(m, _POOLS)]
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    if linears:
        chosen.append((linears[-1], True))
    if not chosen:
        raise GauntletError(
            "Cannot pick default DkNN layers (no ReLU, pooling or Linear modules); "
            "pass `layers` explicitly"
        )
    return chosen


def _flat(t: torch.Tensor) -> torch.Tensor:
    """One layer's (n, d) features: feature maps above _GRID x _GRID are pooled first."""
    if t.dim() == 4 and max(t.shape[-2:]) > _GRID:
        t = nn.functional.adaptive_avg_pool2d(t, (min(t.shape[-2], _GRID), min(t.shape[-1], _GRID)))
    return t.flatten(1)


class DeepKNN:
    """A DkNN over ``model``: index ``(x_train, y_train)``, calibrate on ``(x_cal, y_cal)``.

    ``layers`` are module names (relative to the bare network) or modules; their outputs
    are the features. Without a calibration split, ``min(750, len(x_train) // 3)`` training
    points are held out for it (chosen by ``seed``) and the rest are indexed: calibrating
    on indexed points would find each point among its own neighbours and make every
    nonconformity look too small.
    """

    def __init__(
        self,
        model: nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_cal: torch.Tensor | None = None,
        y_cal: torch.Tensor | None = None,
        *,
        layers: Sequence[Layer] | None = None,
        k: int = DEFAULT_K,
        num_classes: int | None = None,
        calibration_size: int = DEFAULT_CALIBRATION,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise GauntletError(f"Expected `k` to be a positive int, but got {k!r}")
        if len(x_train) != len(y_train):
            raise GauntletError("x_train and y_train have different lengths")
        if (x_cal is None) != (y_cal is None):
            raise GauntletError("Pass both x_cal and y_cal, or neither")
        self.model = model
        self.k = k
        self.batch_size = batch_size
        self.layers = self._resolve(layers)

        if x_cal is None:
            size = min(calibration_size, len(x_train) // 3)
            if size < 1:
                raise GauntletError("Too few training points to hold out a calibration split")
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
            cal, rest = order[:size], order[size:]
            x_cal, y_cal = x_train[cal], y_train[cal]
            x_train, y_train = x_train[rest], y_train[rest]
        if k > len(x_train):
            raise GauntletError(f"k={k} exceeds the {len(x_train)} indexed training points")

        self.num_classes = int(num_classes or int(y_train.max()) + 1)
        self.train_labels = y_train.long().cpu()
        self.train_features = self.features(x_train)
        # Sorted so that |{a in A : a >= t}| is one searchsorted per query.
        cal_alpha = self.nonconformity(x_cal).gather(1, y_cal.long().view(-1, 1)).squeeze(1)
        self.calibration, _ = torch.sort(cal_alpha)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The index and calibration scores as named tensors (for a safetensors artifact)."""
        tensors = {f"features.{i}": f.contiguous() for i, f in enumerate(self.train_features)}
        tensors["train_labels"] = self.train_labels.contiguous()
        tensors["calibration"] = self.calibration.contiguous()
        tensors["num_classes"] = torch.tensor(self.num_classes)
        return tensors

    @classmethod
    def from_tensors(
        cls,
        model: nn.Module,
        tensors: Mapping[str, torch.Tensor],
        *,
        layers: Sequence[Layer] | None = None,
        k: int = DEFAULT_K,
        batch_size: int = 256,
    ) -> DeepKNN:
        """A DkNN over ``model`` from ``to_tensors`` output, without recomputing features."""
        knn = cls.__new__(cls)
        knn.model, knn.k, knn.batch_size = model, k, batch_size
        knn.layers = knn._resolve(layers)
        try:
            knn.train_features = [tensors[f"features.{i}"].float() for i in range(len(knn.layers))]
            knn.train_labels = tensors["train_labels"].long()
            knn.calibration = tensors["calibration"]
            knn.num_classes = int(tensors["num_classes"])
        except KeyError as exc:
            raise GauntletError(f"The stored DkNN state lacks {exc.args[0]!r}") from None
        if any(len(f) != len(knn.train_labels) for f in knn.train_features) or k > len(
            knn.train_labels
        ):
            raise GauntletError("The stored DkNN state does not fit this model and k")
        return knn

    def _resolve(self, layers: Sequence[Layer] | None) -> list[tuple[nn.Module, bool]]:
        if layers is None:
            return default_layers(self.model)
        if not layers:
            raise GauntletError("Expected at least one DkNN layer")
        named = dict(_bare(self.model).named_modules())
        resolved: list[tuple[nn.Module, bool]] = []
        for layer in layers:
            if isinstance(layer, nn.Module):
                resolved.append((layer, False))
            elif layer in named:
                resolved.append((named[layer], False))
            else:
                known = ", ".join(n for n in named if n)
                raise GauntletError(f"Unknown layer {layer!r}; known layers: {known}")
        return resolved

    @contextmanager
    def _capture(self) -> Iterator[list[list[torch.Tensor]]]:
        """Hooks that append each chosen layer's flat features, per forward pass."""
        captured: list[list[torch.Tensor]] = [[] for _ in self.layers]
        handles = []
        for i, (module, read_input) in enumerate(self.layers):
            # Default arguments bind i now; a closure would see only the last value.
            if read_input:

                def pre_hook(_m, args, i=i):
                    captured[i].append(_flat(args[0]))

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:

                def hook(_m, _args, out, i=i):
                    captured[i].append(_flat(out))

                handles.append(module.register_forward_hook(hook))
        was_training = self.model.training
        self.model.eval()
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)

    @staticmethod
    def _once(captured: list[list[torch.Tensor]], passes: int) -> None:
        if any(len(c) != passes for c in captured):
            raise GauntletError(
                "A DkNN layer ran more or less than once per forward pass (a module the "
                "network reuses); pass `layers` naming modules that run once"
            )

    def differentiable_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the (n, d) features of ``x`` on its device, with their graph: what a
        feature-space attack differentiates."""
        with self._capture() as captured:
            self.model(x)
        self._once(captured, 1)
        return [c[0] for c in captured]

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the flattened (n, d) features of ``x`` (on the CPU, float32)."""
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        passes = 0
        with self._capture() as captured:
            for start in range(0, len(x), self.batch_size):
                self.model(x[start : start + self.batch_size].to(device))
                passes += 1
                self._once(captured, passes)
                for c in captured:
                    c[-1] = c[-1].float().cpu()
        return [torch.cat(c) if c else torch.zeros(0, 0) for c in captured]

    def neighbour_counts(self, x: torch.Tensor) -> torch.Tensor:
        """(n, num_classes) int64: neighbours of each label, summed over layers."""
        counts = torch.zeros(len(x), self.num_classes, dtype=torch.long)
        for feats, index in zip(self.features(x), self.train_features, strict=True):
            for start in range(0, len(feats), _CHUNK):
                dist = torch.cdist(feats[start : start + _CHUNK], index)
                nearest = dist.topk(self.k, dim=1, largest=False).indices
                labels = self.train_labels[nearest]
                counts[start : start + _CHUNK] += nn.functional.one_hot(
                    labels, self.num_classes
                ).sum(1)
        return counts

    def nonconformity(self, x: torch.Tensor) -> torch.Tensor:
        """(n, num_classes) int64: alpha(x, j) = neighbours over all layers with label != j."""
        return len(self.layers) * self.k - self.neighbour_counts(x)

    def p_values(self, x: torch.Tensor) -> torch.Tensor:
        """(n, num_classes) float64 on the 1/|A| grid."""
        alpha = self.nonconformity(x)
        size = len(self.calibration)
        # searchsorted(left) = |{a in A : a < alpha}|, so the rest have a >= alpha.
        below = torch.searchsorted(self.calibration, alpha.flatten(), right=False)
        return ((size - below).view_as(alpha)).double() / size

    def predict(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prediction, credibility, confidence, p_values) for a batch of inputs."""
        p = self.p_values(x)
        top2 = p.topk(min(2, self.num_classes), dim=1).values
        pred = p.argmax(dim=1)
        credibility = top2[:, 0]
        second = top2[:, 1] if self.num_classes > 1 else torch.zeros_like(credibility)
        return pred, credibility, 1.0 - second, p

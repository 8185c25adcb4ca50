"""Deep k-NN as a rejecting defense (Papernot & McDaniel 2018).

The deployed answer is the DkNN's: the label with the largest conformal p-value, given
only when its credibility reaches ``threshold``; below it the input is rejected. On
clean data the true label's p-value is uniform on the calibration grid, so a threshold
of 0.1 rejects at most about 10% of correctly classified clean inputs; adversarial
inputs, whose layers disagree, fall below it far more often.

``forward`` is the underlying network: a non-adaptive attack is the white-box attack on
the DkNN's DNN that the paper evaluates, judged on the DkNN's decision. An adaptive
evaluation adds the feature-space attack of Sitawarin & Wagner 2019
(``workers.attacks.dknn_adaptive``), which aims for an accepted wrong answer. The index
and calibration scores are fitted on the training split and kept as the defense's
artifact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.defenses.base import Defense, register_defense
from gauntlet.workers.defenses.dknn_index import DEFAULT_CALIBRATION, DEFAULT_K, DeepKNN
from gauntlet.workers.hyperparams import integer, real


@register_defense
class DkNN(Defense):
    """Reject inputs whose DkNN credibility is below ``threshold``.

    ``index_size`` caps the indexed training points (a seeded sample): the index holds
    every chosen layer's features for each of them, which for large datasets and wide
    layers would not fit in memory.
    """

    name = "dknn"
    needs_fit = True
    fit_uses_model = True
    rejects = True
    # 2: layers by module path (residual stages), feature maps pooled to 4x4.
    version = 2

    hyperparams = {
        "k": integer(DEFAULT_K, 1, 10_000),
        "calibration_size": integer(DEFAULT_CALIBRATION, 1, 1_000_000),
        "index_size": integer(10_000, 1, 10_000_000),
        "threshold": real(0.1, 0.0, 1.0),
        "seed": integer(0, 0),
    }

    def prepare(self) -> None:
        self.knn: DeepKNN | None = None

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.model is None:
            raise GauntletError("dknn needs the model it defends before it can be fitted")
        keep = self.index_size + min(self.calibration_size, len(x) // 3)
        if len(x) > keep:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
            pick = order[:keep].sort().values
            x, y = x[pick], y[pick]
        self.knn = DeepKNN(
            self.model, x, y, k=self.k, calibration_size=self.calibration_size, seed=self.seed
        )

    def _fitted(self) -> DeepKNN:
        if self.knn is None:
            raise GauntletError("dknn is not fitted yet: fit it on training images first")
        return self.knn

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._fitted().to_tensors()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.model is None:
            raise GauntletError("dknn needs the model it defends to load its index")
        self.knn = DeepKNN.from_tensors(self.model, tensors, k=self.k)

    def decide(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred, credibility, _, _ = self._fitted().predict(x.detach())
        return pred.to(x.device), (credibility >= self.threshold).to(x.device)

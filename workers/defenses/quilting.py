"""Image quilting (Guo et al. 2018): rebuild each input from clean training patches.

Every non-overlapping ``patch`` x ``patch`` tile of the input is replaced by its L2
nearest neighbour in a database of patches cut from clean training images, so the output
lies on a union of clean patches and small perturbations snap back to one of them. The
operation is piecewise constant: it is registered as non-differentiable, and adaptive
attacks use BPDA (Athalye et al. 2018 broke it that way).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.defenses.base import Defense, register_defense
from gauntlet.workers.hyperparams import integer

# Query tiles per torch.cdist call: bounds memory at chunk * database_size floats.
_CHUNK = 2048


def patch_database(images: torch.Tensor, patch: int, database_size: int, seed: int) -> torch.Tensor:
    """(m, C*patch*patch) distinct patches of ``images``, at most ``database_size``.

    All stride-1 patches are cut, duplicates dropped (digits are mostly blank, and a
    database full of copies of the empty patch wastes its budget), then a seeded sample
    is kept. ``torch.unique`` sorts its rows, so the result depends only on the data.
    """
    if images.dim() != 4:
        raise GauntletError(f"Expected (n, C, H, W) images, but got shape {tuple(images.shape)}")
    if patch > min(images.shape[-2:]):
        raise GauntletError(f"patch {patch} is larger than the {tuple(images.shape[-2:])} images")
    rows = F.unfold(images.float(), patch).transpose(1, 2).reshape(-1, images.shape[1] * patch**2)
    rows = torch.unique(rows, dim=0)
    if len(rows) > database_size:
        keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        rows = rows[keep[:database_size].sort().values]
    return rows.contiguous()


def _starts(size: int, patch: int) -> list[int]:
    """Tile origins along one axis: a stride-``patch`` grid, plus one flush with the edge
    when ``patch`` does not divide ``size`` (that last tile overlaps its neighbour)."""
    starts = list(range(0, size - patch + 1, patch))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


@register_defense
class Quilting(Defense):
    """Replace each ``patch`` x ``patch`` tile by its nearest clean training patch.

    The database is fitted from the training split of the job's dataset and kept as the
    defense's artifact (``workers.defenses.state``), or set directly with ``set_database``.
    """

    name = "quilting"
    differentiable = False
    needs_fit = True

    hyperparams = {
        "patch": integer(3, 1, 32),
        "database_size": integer(5000, 1, 1_000_000),
        "seed": integer(0, 0),
    }

    def prepare(self) -> None:
        self._database: torch.Tensor | None = None

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._database = patch_database(x.cpu(), self.patch, self.database_size, self.seed)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"database": self.database_tensor()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "database" not in tensors:
            raise GauntletError("The stored quilting state has no `database` tensor")
        self.set_database(tensors["database"])

    def set_database(self, database: torch.Tensor) -> None:
        """Use ``database`` ((m, C*patch*patch) rows) instead of building one."""
        if database.dim() != 2 or len(database) == 0 or database.shape[1] % self.patch**2:
            raise GauntletError(
                f"Expected a non-empty (m, C*{self.patch}*{self.patch}) patch database, "
                f"but got shape {tuple(database.shape)}"
            )
        self._database = database.detach().float().cpu().contiguous()

    def database_tensor(self) -> torch.Tensor:
        if self._database is None:
            raise GauntletError(
                "quilting has no patch database yet: fit it on training images or give "
                "one with set_database"
            )
        return self._database

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch
        database = self.database_tensor().to(x.device)
        if database.shape[1] != c * p * p:
            raise GauntletError(
                f"The patch database holds {database.shape[1]}-value patches, but "
                f"{c}-channel {p}x{p} tiles have {c * p * p}"
            )
        if p > min(h, w):
            raise GauntletError(f"patch {p} is larger than the {h}x{w} images")
        tiles = [(i, j) for i in _starts(h, p) for j in _starts(w, p)]
        x = x.detach().float()
        # (n, tiles, C*p*p), in the channel-major order F.unfold uses for the database.
        queries = torch.stack([x[:, :, i : i + p, j : j + p].reshape(n, -1) for i, j in tiles], 1)
        flat = queries.reshape(-1, c * p * p)
        nearest = torch.cat(
            [
                torch.cdist(flat[s : s + _CHUNK], database).argmin(dim=1)
                for s in range(0, len(flat), _CHUNK)
            ]
        )
        chosen = database[nearest].view(n, len(tiles), c, p, p)
        out = x.clone()
        # In tile order, so an edge tile that overlaps its neighbour is written last and
        # appears whole; interior tiles on the regular grid never overlap.
        for t, (i, j) in enumerate(tiles):
            out[:, :, i : i + p, j : j + p] = chosen[:, t]
        return out

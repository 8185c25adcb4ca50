"""A content-addressed artifact store: files named by their sha256.

Submitted weights, plots and JSON reports live here. A file's name is its hash, so the
same upload stored twice is one file, and a reader can check that what it got is what
was stored (a corrupt or tampered file fails that job, loudly, instead of scoring a
different model). The root is a directory: local, or a shared filesystem on a cluster.
Where workers share no filesystem with the scheduler, they reach this store through Ray
(``cluster.artifact_actor`` and ``workers.remote_store``, same interface).

Beside the content-addressed files, a few *named* blobs are mutable: a job's checkpoint
and the reference from a defense's identity to its fitted state. Their names are
relative paths under the root (``checkpoints/job-7.safetensors``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from gauntlet.cluster.errors import GauntletError

_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A named blob: one known folder and one file name; no way out of the root.
_NAME = re.compile(r"^(checkpoints|defense-state)/[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise GauntletError(
            f"Expected a blob name like checkpoints/job-1.safetensors, got {name!r}"
        )
    return name


def replace_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` beside ``target`` and rename: readers see the old or the new file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, sha: str) -> Path:
        if not _SHA256.match(sha):
            raise GauntletError(f"Expected an artifact id of 64 hex digits, but got {sha!r}")
        return self.root / sha[:2] / sha

    def put_file(self, source: str | os.PathLike) -> str:
        """Copy ``source`` into the store; returns its sha256."""
        sha = sha256_file(source)
        with open(source, "rb") as handle:
            self._write(sha, iter(lambda: handle.read(_CHUNK), b""))
        return sha

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._write(sha, iter([data]))
        return sha

    def _write(self, sha: str, chunks) -> None:
        target = self._path(sha)
        if target.exists() and sha256_file(target) == sha:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: readers never see a half-written file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, sha: str) -> bool:
        return self._path(sha).exists()

    def get(self, sha: str) -> Path:
        """The stored file, after checking its content still hashes to ``sha``."""
        path = self._path(sha)
        if not path.exists():
            raise GauntletError(f"artifact {sha[:12]} is missing from the store at {self.root}")
        actual = sha256_file(path)
        if actual != sha:
            raise GauntletError(
                f"artifact {sha[:12]} is corrupt: its content hashes to {actual[:12]}; "
                "submit the model again to restore it"
            )
        return path

    # -- named (mutable) blobs ----------------------------------------------------------

    def named_path(self, name: str) -> Path:
        return self.root / check_name(name)

    def get_named(self, name: str) -> bytes | None:
        try:
            return self.named_path(name).read_bytes()
        except FileNotFoundError:
            return None

    def put_named(self, name: str, data: bytes) -> None:
        replace_atomically(self.named_path(name), data)

    def delete_named(self, name: str) -> None:
        self.named_path(name).unlink(missing_ok=True)

"""The artifact store as a worker sees it: a local path, or the scheduler's store via Ray.

``open_store(address)`` gives an object with ``ArtifactStore``'s interface for either
kind of address (see ``cluster.artifact_actor``). The remote store downloads what a job
reads into a node-local cache, the worker's own ``GAUNTLET_ARTIFACTS``, and checks its
sha256 there; the cache is content-addressed, so the next job on that node that needs
the same weights reads them from disk. What a job writes goes to the scheduler's store
only (a worker's disk does not fill with other jobs' outputs).
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

from gauntlet.cluster.artifact_actor import CHUNK, is_remote, parse_address
from gauntlet.cluster.artifacts import ArtifactStore, check_name, sha256_file
from gauntlet.cluster.errors import GauntletError


def open_store(address) -> ArtifactStore | RemoteArtifactStore:
    """The store named by a payload's ``artifacts``: a path or a ``ray-artifacts://`` URL."""
    if isinstance(address, (ArtifactStore, RemoteArtifactStore)):
        return address
    if is_remote(address):
        from gauntlet.cluster.settings import Settings

        return _remote(address, str(Settings.from_env().artifacts))
    return ArtifactStore(address)


@functools.lru_cache(maxsize=4)
def _remote(address: str, cache: str) -> RemoteArtifactStore:
    # One per worker process and address: the actor lookup is a round trip to the GCS.
    return RemoteArtifactStore(address, cache)


class RemoteArtifactStore:
    """``ArtifactStore``'s interface over the scheduler's artifact actor."""

    def __init__(self, address: str, cache: str | os.PathLike):
        import ray

        self.address = address
        self.root = Path(cache)  # where downloads land; the scheduler's root is not ours
        self.cache = ArtifactStore(cache)
        namespace, name = parse_address(address)
        try:
            self._actor = ray.get_actor(name, namespace=namespace)
        except ValueError:
            # The scheduler that queued this job is gone: transient, another one retries it.
            raise RuntimeError(f"the artifact server {name} is not running") from None
        self._ray = ray

    def _call(self, method: str, *args, **kwargs):
        return self._ray.get(getattr(self._actor, method).remote(*args, **kwargs))

    # -- content-addressed files ---------------------------------------------------------

    def exists(self, sha: str) -> bool:
        self.cache._path(sha)  # checks the id's form
        return self._call("size", "sha", sha) is not None

    def get(self, sha: str) -> Path:
        """A local copy of the stored file, after checking it hashes to ``sha``."""
        cached = self.cache._path(sha)
        if cached.exists() and sha256_file(cached) == sha:
            return cached
        target = cached
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                actual = self._download("sha", sha, out)
            if actual is None:
                raise GauntletError(f"artifact {sha[:12]} is missing from the scheduler's store")
            if actual != sha:
                raise GauntletError(
                    f"artifact {sha[:12]} is corrupt: its content hashes to {actual[:12]}; "
                    "submit the model again to restore it"
                )
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return target

    def _download(self, kind: str, key: str, out) -> str | None:
        """Copy a blob into ``out`` chunk by chunk; its sha256, or None if there is none."""
        size = self._call("size", kind, key)
        if size is None:
            return None
        digest = hashlib.sha256()
        offset = 0
        while offset < size:
            chunk = self._call("read", kind, key, offset, CHUNK)
            if not chunk:
                break  # the blob shrank under us; the hash check says what we got
            out.write(chunk)
            digest.update(chunk)
            offset += len(chunk)
        return digest.hexdigest()

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self._call("size", "sha", sha) is None:
            self._upload(
                [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""], sha=sha
            )
        return sha

    def put_file(self, source: str | os.PathLike) -> str:
        sha = sha256_file(source)
        if self._call("size", "sha", sha) is None:
            with open(source, "rb") as handle:
                self._upload(iter(lambda: handle.read(CHUNK), b""), sha=sha)
        return sha

    def _upload(self, chunks, *, sha: str | None = None, name: str | None = None) -> str:
        token = self._call("begin")
        for chunk in chunks:
            self._call("append", token, chunk)
        return self._call("commit", token, sha=sha, name=name)

    # -- named (mutable) blobs -----------------------------------------------------------

    def get_named(self, name: str) -> bytes | None:
        check_name(name)

        class _Buffer(list):
            write = list.append

        buffer = _Buffer()
        if self._download("named", name, buffer) is None:
            return None
        return b"".join(buffer)

    def put_named(self, name: str, data: bytes) -> None:
        check_name(name)
        self._upload([data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""], name=name)

    def delete_named(self, name: str) -> None:
        self._call("delete_named", check_name(name))

"""The scheduler's artifact store, served to Ray workers that share no filesystem with it.

A Ray actor, started by the scheduler's process and pinned to the scheduler's node,
wraps the scheduler's local ``ArtifactStore``. Workers (``workers.remote_store``) read
and write through it in chunks of ``CHUNK`` bytes, so no single actor message is large,
and verify every sha256 themselves. Only bytes travel: weights and tensors are still
parsed by the safe loaders (safetensors) on the worker, never unpickled.

The actor is not detached: it belongs to the scheduler's driver and dies with it, and a
worker whose job outlives its scheduler fails that job transiently, to be retried by
whichever scheduler claims it next (with its own actor).

The payload names the store by address, ``ray-artifacts://<namespace>/<actor name>``,
where a local store is named by its path: the rest of a job only sees an address.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from gauntlet.cluster.artifacts import ArtifactStore, sha256_file

SCHEME = "ray-artifacts://"
NAMESPACE = "gauntlet"
# 8 MiB: large weights take several calls, none of which stresses the actor's messages.
CHUNK = 8 << 20


def is_remote(address: object) -> bool:
    return isinstance(address, str) and address.startswith(SCHEME)


def parse_address(address: str) -> tuple[str, str]:
    namespace, _, name = address[len(SCHEME) :].partition("/")
    return namespace, name


class ArtifactServer:
    """The actor's body: chunked reads and writes of one local store."""

    def __init__(self, root: str):
        self.store = ArtifactStore(root)
        self.uploads = Path(root) / ".uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def _file(self, kind: str, key: str) -> Path:
        return self.store._path(key) if kind == "sha" else self.store.named_path(key)

    def size(self, kind: str, key: str) -> int | None:
        """The blob's size in bytes; None if there is none."""
        try:
            return self._file(kind, key).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, kind: str, key: str, offset: int, length: int) -> bytes:
        with open(self._file(kind, key), "rb") as handle:
            handle.seek(offset)
            return handle.read(min(length, CHUNK))

    def begin(self) -> str:
        """A new upload: chunks are appended to a private file until it is committed."""
        fd, path = tempfile.mkstemp(dir=self.uploads, prefix="up-")
        os.close(fd)
        return Path(path).name

    def _upload(self, token: str) -> Path:
        if not token.startswith("up-") or "/" in token:
            raise ValueError(f"not an upload: {token!r}")
        return self.uploads / token

    def append(self, token: str, chunk: bytes) -> None:
        with open(self._upload(token), "ab") as out:
            out.write(chunk)

    def commit(self, token: str, *, sha: str | None = None, name: str | None = None) -> str:
        """Move a finished upload into place: as content ``sha`` (checked), or as ``name``."""
        path = self._upload(token)
        try:
            actual = sha256_file(path)
            if name is not None:
                target = self.store.named_path(name)
                target.parent.mkdir(parents=True, exist_ok=True)
            else:
                if actual != sha:
                    raise ValueError(f"upload hashes to {actual[:12]}, not {str(sha)[:12]}")
                target = self.store._path(actual)
                target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            return actual
        finally:
            path.unlink(missing_ok=True)

    def delete_named(self, name: str) -> None:
        self.store.delete_named(name)


def start_server(ray, root: str | os.PathLike):
    """Start the actor on this driver's node; returns (address, handle).

    The caller keeps the handle: a named actor that is not detached is reclaimed once
    no handle to it is left.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    Path(root).mkdir(parents=True, exist_ok=True)
    name = f"artifacts-{uuid.uuid4().hex[:12]}"
    here = ray.get_runtime_context().get_node_id()
    handle = (
        ray.remote(ArtifactServer)
        .options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=0,  # runs on a head node that offers no CPUs to jobs
            max_concurrency=4,  # several workers fetch at once
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote(str(root))
    )
    # Wait until it serves: a server that cannot start fails the scheduler, not its jobs.
    ray.get(handle.node_id.remote(), timeout=120)
    return f"{SCHEME}{NAMESPACE}/{name}", handle

"""Where a job runs and where it writes: Ray start/connect, the storage root, seeding.

Locally a job starts its own Ray; given an address (flag, config or RAY_ADDRESS) it joins a
cluster instead, which is the same code path `ray job submit` and a KubeRay RayJob use.
Storage goes through pyarrow filesystems so a root may be a local path, file://, s3:// or gs://.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from oodscale.config import ExperimentConfig
from oodscale.errors import InputError, SetupError, UserError
from oodscale.uris import refuse_credentials

# Checks run before every `Storage.write_bytes_atomic` and model publish in this process (the
# manifests and cards that make a stage's output exist): oodscale.locking adds one that raises
# once this process has lost its experiment lock.
WRITE_GUARDS: list = []


def check_write_guards() -> None:
    for guard in WRITE_GUARDS:
        guard()


class StorageError(UserError, RuntimeError):
    """A write to the storage root failed (read-only, full, no permission): names the file."""


@dataclass(frozen=True)
class Storage:
    """A pyarrow filesystem plus a base path inside it; paths are '/'-joined strings."""

    fs: pafs.FileSystem
    base: str
    uri: str

    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def uri_of(self, path: str) -> str:
        """`path` as a URI for messages (without the root's query options) and for people:
        code passes (filesystem, path) pairs (this Storage, `at`) and does not parse one of
        these again, since an object-store key with a space, `#`, `%` or `?` does not survive
        the round trip."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return path
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{path}"

    def at(self, path: str) -> Storage:
        """This filesystem with `path` as its base: a pair to hand on, not a URI to re-parse."""
        return Storage(fs=self.fs, base=path, uri=self.uri_of(path))

    def open_uri(self, path: str) -> str:
        """A URI for `path` that other processes (`open_storage`) open as this root does: with
        the root's query options (an S3 endpoint_override, a region) kept."""
        query = self.uri.partition("?")[2] if "://" in self.uri else ""
        return self.uri_of(path) + (f"?{query}" if query else "")

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Write via a temp name then rename, so readers never see a half-written file; a
        failed write removes its temp file and leaves any earlier `path` as it was."""
        check_write_guards()
        parent = path.rsplit("/", 1)[0]
        tmp = f"{path}.tmp-{os.getpid()}-{random.getrandbits(32):08x}"
        try:
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)  # moves a file
        except OSError as err:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise self.write_error(path, err) from err

    def write_error(self, path: str, err: OSError) -> StorageError:
        """The named error of a failed write under this root."""
        return StorageError(
            f"cannot write {self.uri_of(path)}: {err}; the storage root {self.uri} is full, "
            f"read-only or not writable by this user. Free space or fix its permissions (or set "
            f"storage.root elsewhere) and rerun: finished shards, manifests and checkpoints are "
            f"left as they were and the rerun resumes from them")

    def fetch_dir(self, path: str, scratch: Path) -> Path:
        """A local directory holding `path`'s files: itself when local, else a copy in scratch."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return Path(path)
        pafs.copy_files(path, str(scratch), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return scratch

    def makedirs(self, path: str) -> None:
        try:
            self.fs.create_dir(path, recursive=True)
        except OSError as err:
            raise self.write_error(path, err) from err


StorageRoot = str | Storage  # a root as the user wrote it, or one already opened


def open_storage(root: StorageRoot) -> Storage:
    """Resolve a storage root URI or local path to a pyarrow filesystem (parsed once, here: a
    Storage given is returned as it is)."""
    if isinstance(root, Storage):
        return root
    if "://" in root and not root.startswith("file://"):
        fs, base = pafs.FileSystem.from_uri(root)
        return Storage(fs=fs, base=base, uri=root)
    local = root[len("file://"):] if root.startswith("file://") else root
    base = str(Path(local).expanduser().resolve())
    return Storage(fs=pafs.LocalFileSystem(), base=base, uri=base)


@dataclass(frozen=True)
class RunLayout:
    """The run root of one experiment: `<root>/<experiment>/{data,diffusion,synthetic,...}`."""

    storage: Storage
    experiment: str

    def _p(self, *parts: str) -> str:
        return self.storage.path(self.experiment, *parts)

    def id_split(self, split: str) -> str:
        return self._p("data", "id", split)

    def ood_set(self, name: str) -> str:
        return self._p("data", "ood", name)

    def ood_val_set(self, name: str) -> str:
        """An OOD validation set: chooses, never reports (disjoint from every test set)."""
        return self._p("data", "ood-val", name)

    @property
    def diffusion_dir(self) -> str:
        return self._p("diffusion")

    def synthetic_variant(self, dirname: str) -> str:
        """A generator source's shards: `synthetic-w3`, `synthetic-w1-filtered` (names from
        oodscale.outlier_sources, by the source's own guidance)."""
        return self._p(dirname)

    @property
    def reference_dir(self) -> str:
        """The reference classifier every sample-quality figure of the run reads."""
        return self._p("reference")

    def classifier_dir(self, run: str) -> str:
        return self._p("classifiers", run)

    @property
    def classifiers_dir(self) -> str:
        return self._p("classifiers")

    @property
    def eval_dir(self) -> str:
        return self._p("eval")

    @property
    def ray_train_dir(self) -> str:
        return self._p("ray_train")


def layout_for(cfg: ExperimentConfig) -> RunLayout:
    return RunLayout(storage=open_storage(cfg.storage.root), experiment=cfg.name)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, shard index, ...): same input, same seed."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_LOCAL_RAY_STARTED = False  # whether this process started its own Ray (no autoscaler)


def init_ray(cfg: ExperimentConfig, address: str | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` / config / RAY_ADDRESS, or start a local one sized for CI.

    Ray's own logging stays in its log files unless `verbose` (oodscale.raylog)."""
    import ray
    import ray.data

    from oodscale import raylog

    # an error in a Ray Data task reaches the driver as itself (e.g. StorageError), not as
    # UserCodeException, so the CLI can name it (oodscale.errors)
    ray.data.DataContext.get_current().raise_original_map_exception = True
    target = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if target:  # refused even where a Ray is already up: the request itself is wrong
        try:
            refuse_credentials(target, address=True)
        except ValueError as err:
            raise InputError(f"the Ray address (--address, ray.address or RAY_ADDRESS) "
                             f"{err}") from None
    else:
        refuse_open_host(cfg.ray.host)
    if ray.is_initialized():
        return
    quiet = {"PYTHONWARNINGS": "ignore::DeprecationWarning", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    os.environ.update(quiet)  # the driver's own progress bars are ours (tqdm), not Ray Data's
    env = {"env_vars": {**quiet, **raylog.WORKER_ENV}}
    if target:
        probe_ray_address(target)
        ray.init(address=target, runtime_env=env, **raylog.init_options(verbose))
    else:
        cpus = cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1))
        global _LOCAL_RAY_STARTED
        _LOCAL_RAY_STARTED = True
        with listening_on(cfg.ray.host) as node_ip:
            ray.init(
                address="local",  # a new Ray even where `ray start` left one running
                num_cpus=cpus,
                object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
                include_dashboard=False,
                runtime_env=env,
                _node_ip_address=node_ip,
                **raylog.init_options(verbose),
            )
    raylog.after_init(verbose, target)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_host(host: str) -> None:
    """A local Ray on a non-loopback address with token auth off would let anyone who reaches
    that address run code here: ValueError."""
    if not is_loopback(host) and os.environ.get("RAY_AUTH_MODE", "").strip().lower() == \
            "disabled":
        raise InputError(
            f"ray.host={host} would let other machines reach this job's Ray, and "
            f"RAY_AUTH_MODE=disabled turns its token authentication off: unset RAY_AUTH_MODE "
            f"(token auth is Ray's default) or keep ray.host=127.0.0.1")


@contextlib.contextmanager
def listening_on(host: str) -> Iterator[str | None]:
    """Where the local Ray this job starts listens: on loopback alone unless `ray.host` names
    another address; yields the `_node_ip_address` for `ray.init`.

    Ray listens on loopback alone when its node's address is loopback (its GCS, raylet, agents
    and workers then bind 127.0.0.1), but it turns a loopback `_node_ip_address` into the
    machine's address unless its single-machine switch (`ENABLE_RAY_CLUSTER`, the
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` variable, read when ray is imported) is off. So that
    switch is off while `ray.init` starts the node, and only then: nothing is put in the
    environment of other processes. Ray's processes get the node address as arguments;
    tests/test_runtime_loopback.py checks what they listen on, so a Ray that moves the switch
    fails there. A non-loopback address with token auth off is refused (`refuse_open_host`)."""
    from ray._private import ray_constants

    if not is_loopback(host):
        refuse_open_host(host)
        yield host
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield "127.0.0.1"
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def probe_ray_address(target: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, when nothing listens there: `ray.init` itself
    retries a dead address for minutes. `auto` and addresses without a port are left to Ray."""
    host, _, port = target.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise SetupError(f"no Ray cluster answers at {target} ({err}); start it (e.g. "
                           f"cluster/start-local-head.sh) or fix --address / RAY_ADDRESS / "
                           f"ray.address (leave all three unset to start a local Ray)") from None


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def require_gpus(count: int, key: str) -> None:
    """A pool of `count` one-GPU actors on a cluster with fewer GPUs waits for the missing
    ones: forever on the local Ray this job started (refused), until an autoscaler adds GPU
    nodes on a cluster it joined (said once, then left to wait)."""
    import ray

    have = int(ray.cluster_resources().get("GPU", 0))
    if count <= have:
        return
    message = (f"{key}={count} asks for {count} one-GPU actors but the cluster has {have} "
               f"GPU(s); set {key}={max(have, 1)} or add GPU nodes")
    if _LOCAL_RAY_STARTED:
        raise InputError(message)
    print(f"[oodscale] warning: {message}; waiting for an autoscaler to add them", flush=True)


def resolve_use_gpu(flag: bool | None) -> bool:
    return cluster_has_gpus() if flag is None else flag

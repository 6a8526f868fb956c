"""One writer per experiment root: a lock file that names its holder.

Two runs writing one experiment at once would interleave manifests and checkpoints, so every
command that writes takes `<root>/<experiment>/.oodscale.lock` first. The file names the holder
(host, pid, the pid's start time, the command, a heartbeat the holder refreshes, and the owner:
the retried unit it belongs to, e.g. a RayJob, from `OODSCALE_LOCK_OWNER`). A lock is stale,
and taken over, when its holder is on this host and that process is gone (or the pid now
belongs to a later process), when it is an earlier attempt of this holder's owner (a RayJob
retried after its head pod died takes its own lock back at once), or, for a holder on another
host, when its heartbeat is older than `STALE_AFTER_S`.

How atomic that is depends on the storage root:

* local filesystems: creation is exclusive (O_EXCL); taking a stale lock over renames it aside
  first (of two takers, one rename succeeds).
* s3:// (with boto3 installed, `oodscale[s3]`): every change is an S3 conditional write, atomic
  on the server: creation `If-None-Match: *` (of two creators, one gets 412), taking over,
  heartbeats and release `If-Match: <the ETag read>` (of two takers one wins; a heartbeat whose
  lock was taken fails instead of overwriting the new holder).
* other object stores (gs://, or s3:// without boto3): pyarrow exposes no conditional write
  there, so creation is write-then-read-back after 0.5 s: two runs that start within about the
  time of one PUT may both believe they hold the lock. Stale detection and release are as
  above, without atomicity.

A holder whose heartbeat finds the lock gone or held by another stops: the heartbeat thread
marks the lock lost, so the driver's next manifest or card write (`Storage.write_bytes_atomic`)
or model publish (`distributed.publish_dir`) raises `LockedError`, and interrupts the driver's
main thread, whose exit ends the job's Ray tasks. Not guaranteed: writes already under way, and
writes inside Ray workers (shards, a classifier that rank 0 publishes) between the loss and the
driver's exit, finish; the loss is seen at the next heartbeat (`HEARTBEAT_S`).
"""

from __future__ import annotations

import _thread
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psutil
import pyarrow.fs as pafs

from oodscale import runtime
from oodscale.errors import UserError
from oodscale.runtime import RunLayout, Storage

LOCK = ".oodscale.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# Names the retried unit a holder belongs to: every attempt of one RayJob sets the same value
# (manifests/base: the RayJob's namespace and name), so a retry takes over its crashed
# attempt's lock at once instead of waiting STALE_AFTER_S.
OWNER_ENV = "OODSCALE_LOCK_OWNER"


class LockedError(UserError, RuntimeError):
    """Another live run holds the experiment root; the message names it."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: float  # the process's start time: a reused pid is not the holder
    command: str
    since: float
    heartbeat: float
    owner: str = ""  # OWNER_ENV of the holder ("" for none); older lock files lack it

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        owner = f" ({self.owner})" if self.owner else ""
        return (f"`oodscale {self.command}`, pid {self.pid} on host {self.host}{owner}, "
                f"since {started}")

    def same_process(self, other: Holder) -> bool:
        return (self.host, self.pid, self.since) == (other.host, other.pid, other.since)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


UNREADABLE = Holder("?", -1, 0.0, "?", 0.0, 0.0)  # a lock file nobody could have written whole


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def me(command: str) -> Holder:
    now = time.time()
    pid = os.getpid()
    return Holder(socket.gethostname(), pid, _start_time(pid) or now, command, now, now,
                  os.environ.get(OWNER_ENV, ""))


def stale_reason(holder: Holder, now: float | None = None,
                 taker: Holder | None = None) -> str | None:
    """Why `holder` no longer holds the lock, or None while it may still be running."""
    now = time.time() if now is None else now
    if (taker is not None and holder.owner and holder.owner == taker.owner
            and not holder.same_process(taker)):
        return f"it is an earlier attempt of {holder.owner}"
    if holder.host == socket.gethostname():
        started = _start_time(holder.pid)
        if started is None:
            return f"pid {holder.pid} is not running"
        if abs(started - holder.pid_started) > 1.0:
            return f"pid {holder.pid} now belongs to a later process"
        return None
    if now - holder.heartbeat > STALE_AFTER_S:
        return f"no heartbeat for {now - holder.heartbeat:.0f} s"
    return None


def _decode(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None


class FileLock:
    """The lock file on any pyarrow filesystem: exclusive creation on local disk, elsewhere
    write-then-read-back (see the module docstring for what that guarantees). The tag of a
    read is the holder read."""

    def __init__(self, storage: Storage, path: str):
        self.storage, self.path = storage, path

    def read(self, retry: bool = True) -> tuple[Holder | None, Any]:
        try:
            holder = _decode(self.storage.read_bytes(self.path))
        except FileNotFoundError:
            return None, None
        except OSError:
            holder = None
        if holder is None:
            if retry:  # its creator may be between creating and writing it
                time.sleep(0.2)
                return self.read(retry=False)
            holder = UNREADABLE
        return holder, holder

    def create(self, holder: Holder) -> bool:
        """Create the lock file if none exists; True when `holder` now holds it."""
        storage, path, data = self.storage, self.path, holder.encode()
        storage.makedirs(path.rsplit("/", 1)[0])
        if isinstance(storage.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            except OSError as err:  # read-only or full root: the named storage error
                raise storage.write_error(path, err) from err
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except OSError as err:
                os.unlink(path)
                raise storage.write_error(path, err) from err
            return True
        if storage.exists(path):
            return False
        storage.write_bytes_atomic(path, data)
        time.sleep(0.5)  # a concurrent writer's rename lands within this; the last one wins
        return self.read()[0] == holder

    def take_over(self, tag: Any, holder: Holder) -> bool:
        """Replace the stale lock read as `tag` by `holder`, unless it changed since."""
        if self.read()[1] != tag:
            return False
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            self.storage.fs.move(self.path, aside)  # moves a file: of two takers, one moves it
        except OSError:
            return False
        self.storage.fs.delete_file(aside)
        return self.create(holder)

    def refresh(self, tag: Any, holder: Holder) -> Any | None:
        """Rewrite our lock with `holder` (a fresh heartbeat); the new tag, or None when it is
        no longer ours."""
        current, _ = self.read()
        if current is None or not current.same_process(holder):
            return None
        self.storage.write_bytes_atomic(self.path, holder.encode())
        return holder

    def release(self, tag: Any, holder: Holder) -> None:
        current, _ = self.read()
        if current is not None and current.same_process(holder):
            self.storage.fs.delete_file(self.path)


class S3Lock:
    """The lock object on S3, every change a conditional write (If-None-Match / If-Match on
    the ETag read), through boto3 with the endpoint and region of the storage root's URI and
    the credentials of the environment, as pyarrow finds them. The tag is the object's ETag."""

    def __init__(self, storage: Storage, path: str):
        import boto3

        options = dict(parse_qsl(urlsplit(storage.uri).query))
        endpoint = options.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
        self.client = boto3.client("s3", endpoint_url=endpoint,
                                   region_name=options.get("region") or None)
        self.storage, self.path = storage, path
        self.bucket, self.key = path.split("/", 1)

    def _failed(self, err: Exception) -> bool:
        """Whether `err` is a failed precondition (someone else changed the lock)."""
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412",
                        "409", "404")

    def _put(self, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                          **condition)["ETag"]
        except ClientError as err:
            if self._failed(err):
                return None
            raise self.storage.write_error(self.path, OSError(str(err))) from err

    def read(self) -> tuple[Holder | None, Any]:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if self._failed(err):
                return None, None
            raise
        return _decode(got["Body"].read()) or UNREADABLE, got["ETag"]

    def create(self, holder: Holder) -> bool:
        self.tag = self._put(holder.encode(), IfNoneMatch="*")
        return self.tag is not None

    def take_over(self, tag: Any, holder: Holder) -> bool:
        self.tag = self._put(holder.encode(), IfMatch=tag)
        return self.tag is not None

    def refresh(self, tag: Any, holder: Holder) -> Any | None:
        return self._put(holder.encode(), IfMatch=tag)

    def release(self, tag: Any, holder: Holder) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=tag)
        except ClientError as err:
            if not self._failed(err):
                raise


def lock_at(storage: Storage, path: str) -> FileLock | S3Lock:
    """The lock at `path`: conditional writes on s3:// where boto3 is installed."""
    if storage.uri.startswith("s3://"):
        try:
            import boto3  # noqa: F401
        except ImportError:
            return FileLock(storage, path)
        return S3Lock(storage, path)
    return FileLock(storage, path)


def acquire(lock: FileLock | S3Lock, holder: Holder) -> Any:
    """Hold `lock` or raise `LockedError` naming the live holder; returns the tag it holds."""
    storage, path = lock.storage, lock.path
    for _ in range(5):
        if lock.create(holder):
            return lock.read()[1] if isinstance(lock, FileLock) else lock.tag
        current, tag = lock.read()
        if current is None:
            continue  # released between our two looks
        reason = stale_reason(current, taker=holder)
        if reason is None:
            raise LockedError(
                f"{storage.uri_of(path.rsplit('/', 1)[0])} is being written by "
                f"{current.describe()}; one run per experiment root: wait for it to finish, "
                f"stop it, or set storage.root / name to another location. If that run is dead "
                f"(e.g. its host is gone), delete {storage.uri_of(path)}")
        print(f"[oodscale] taking over the stale lock of {current.describe()}: {reason}",
              flush=True)
        if lock.take_over(tag, holder):
            return lock.read()[1] if isinstance(lock, FileLock) else lock.tag
    raise LockedError(f"could not take {storage.uri_of(path)}: it keeps changing hands")


@contextmanager
def experiment_lock(layout: RunLayout, command: str) -> Iterator[Holder]:
    """Hold the experiment root's lock for the duration, refreshing its heartbeat; a lost lock
    stops this process (module docstring)."""
    storage = layout.storage
    path = storage.path(layout.experiment, LOCK)
    lock = lock_at(storage, path)
    holder = me(command)
    tag = acquire(lock, holder)
    stop = threading.Event()
    lost: list[str] = []

    def beat() -> None:
        nonlocal tag
        while not stop.wait(HEARTBEAT_S):
            fresh = Holder(**{**asdict(holder), "heartbeat": time.time()})
            try:
                tag = lock.refresh(tag, fresh)
            except OSError:
                continue  # storage errors surface in the stage itself
            if tag is None:
                current, _ = lock.read()
                lost.append(f"the lock {storage.uri_of(path)} was taken"
                            + (f" by {current.describe()}" if current else " away"))
                print(f"[oodscale] stopping: {lost[0]}", flush=True)
                runtime.WRITE_GUARDS.append(guard)
                if not stop.is_set():
                    _thread.interrupt_main()
                return

    def guard() -> None:
        raise LockedError(f"{lost[0]}; this run stopped writing")

    thread = threading.Thread(target=beat, name="oodscale-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield holder
    except KeyboardInterrupt:
        if lost:
            raise LockedError(f"{lost[0]}; this run stopped") from None
        raise
    finally:
        stop.set()
        thread.join()
        if guard in runtime.WRITE_GUARDS:
            runtime.WRITE_GUARDS.remove(guard)
        if not lost and tag is not None:
            lock.release(tag, holder)
    if lost:  # finished after losing the lock: not a success
        raise LockedError(f"{lost[0]} while this run held it; check what it wrote")

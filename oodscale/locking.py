"""One writer per experiment root: a lock file that names its holder.

Two runs writing one experiment at once would interleave manifests and checkpoints, so every
command that writes takes `<root>/<experiment>/.oodscale.lock` first. The file names the holder
(host, pid, the pid's start time, the command, a heartbeat the holder refreshes). A lock is
stale, and taken over, when its holder is on this host and that process is gone (or the pid now
belongs to a later process), or, for a holder on another host, when its heartbeat is older than
`STALE_AFTER_S`. Creation is exclusive on local filesystems (O_EXCL); on object stores, which
have no exclusive create, it is write-then-read-back (a race narrower than a second, not zero).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import psutil
import pyarrow.fs as pafs

from oodscale.runtime import RunLayout, Storage

LOCK = ".oodscale.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class LockedError(RuntimeError):
    """Another live run holds the experiment root; the message names it."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: float  # the process's start time: a reused pid is not the holder
    command: str
    since: float
    heartbeat: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"`oodscale {self.command}`, pid {self.pid} on host {self.host}, since {started}"


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def me(command: str) -> Holder:
    now = time.time()
    pid = os.getpid()
    return Holder(socket.gethostname(), pid, _start_time(pid) or now, command, now, now)


def stale_reason(holder: Holder, now: float | None = None) -> str | None:
    """Why `holder` no longer holds the lock, or None while it may still be running."""
    now = time.time() if now is None else now
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


def _read(storage: Storage, path: str, retry: bool = True) -> Holder | None:
    try:
        return Holder(**json.loads(storage.read_bytes(path)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, OSError):
        if retry:  # its creator may be between creating and writing it
            time.sleep(0.2)
            return _read(storage, path, retry=False)
        return Holder("?", -1, 0.0, "?", 0.0, 0.0)  # unreadable: a dead holder


def _create(storage: Storage, path: str, holder: Holder) -> bool:
    """Create the lock file if none exists; True when this process now holds it."""
    data = json.dumps(asdict(holder)).encode()
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
    return _read(storage, path) == holder


def _take_over(storage: Storage, path: str, seen: Holder) -> None:
    """Remove a stale lock, unless someone replaced it since we read it."""
    if _read(storage, path) != seen:
        return
    aside = f"{path}.stale-{os.getpid()}"
    try:
        storage.fs.move(path, aside)  # moves a file: of two takers, one moves it
    except (FileNotFoundError, OSError):
        return
    storage.fs.delete_file(aside)


def acquire(storage: Storage, path: str, holder: Holder) -> None:
    """Hold the lock at `path` or raise `LockedError` naming the live holder."""
    for _ in range(5):
        if _create(storage, path, holder):
            return
        current = _read(storage, path)
        if current is None:
            continue  # released between our two looks
        reason = stale_reason(current)
        if reason is None:
            raise LockedError(
                f"{storage.uri_of(path.rsplit('/', 1)[0])} is being written by "
                f"{current.describe()}; one run per experiment root: wait for it to finish, "
                f"stop it, or set storage.root / name to another location. If that run is dead "
                f"(e.g. its host is gone), delete {storage.uri_of(path)}")
        print(f"[oodscale] taking over the stale lock of {current.describe()}: {reason}",
              flush=True)
        _take_over(storage, path, current)
    raise LockedError(f"could not take {storage.uri_of(path)}: it keeps changing hands")


def release(storage: Storage, path: str, holder: Holder) -> None:
    current = _read(storage, path)
    if current is not None and (current.host, current.pid, current.since) == (
            holder.host, holder.pid, holder.since):
        storage.fs.delete_file(path)


@contextmanager
def experiment_lock(layout: RunLayout, command: str) -> Iterator[Holder]:
    """Hold the experiment root's lock for the duration, refreshing its heartbeat."""
    storage = layout.storage
    path = storage.path(layout.experiment, LOCK)
    holder = me(command)
    acquire(storage, path, holder)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            current = _read(storage, path)
            if current is None or (current.pid, current.since) != (holder.pid, holder.since):
                return  # taken from us: leave it to its new holder
            fresh = Holder(**{**asdict(holder), "heartbeat": time.time()})
            try:
                storage.write_bytes_atomic(path, json.dumps(asdict(fresh)).encode())
            except OSError:
                return  # storage errors surface in the stage itself

    thread = threading.Thread(target=beat, name="oodscale-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join()
        release(storage, path, holder)

"""The CLI names the error of ours behind Ray's wrapping of it, and lets a bug's traceback show."""

from __future__ import annotations

from oodscale.data.shards import ShardError
from oodscale.errors import named_error
from oodscale.runtime import StorageError


class _RayWrapper(Exception):
    """Stands for Ray's wrappers (RayTaskError, UserCodeException): module ray.*."""


_RayWrapper.__module__ = "ray.exceptions"


class _WorkerGroupError(_RayWrapper):
    def __init__(self, failures: dict[int, BaseException]):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_innermost_named_error_behind_ray_wrappers():
    inner = StorageError("cannot write x.tar: No space left on device")
    wrapper = _RayWrapper("remote traceback ...")
    wrapper.cause = inner
    outer = RuntimeError("dataset execution failed")
    outer.__cause__ = wrapper
    assert named_error(outer) is inner


def test_a_train_workers_error_is_found():
    inner = ShardError("shard a.tar is corrupt (sha256 ...)")
    assert named_error(_WorkerGroupError({0: inner})) is inner


def test_a_bug_is_not_named():
    assert named_error(_RayWrapper("boom")) is None
    assert named_error(KeyError("x")) is None

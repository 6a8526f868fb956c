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


def test_the_users_mistakes_share_one_base_and_a_torch_bug_is_not_one():
    from oodscale.config import ConfigError
    from oodscale.errors import InputError, MissingError, SetupError, UserError
    from oodscale.locking import LockedError

    for kind in (ConfigError, ShardError, StorageError, LockedError, InputError, MissingError,
                 SetupError):
        assert issubclass(kind, UserError), kind
        assert named_error(kind("named")) is not None
    # what torch raises for a shape or device mismatch: a bug, whose traceback must show
    shape_bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)")
    assert named_error(shape_bug) is None
    assert named_error(ValueError("a bare ValueError from a library")) is None


def test_the_cli_prints_a_bugs_traceback(monkeypatch, capsys):
    import pytest

    from oodscale import cli

    def broken(cfg, layout):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setitem(cli.STAGES, "status", broken)
    with pytest.raises(RuntimeError, match="mat1"):
        cli.main(["status", "configs/digits.yaml"])
    monkeypatch.setitem(cli.STAGES, "status", lambda cfg, layout: (_ for _ in ()).throw(
        ShardError("shard a.tar is corrupt; rerun `oodscale prepare`")))
    assert cli.main(["status", "configs/digits.yaml"]) == 1
    assert "error: shard a.tar is corrupt" in capsys.readouterr().err

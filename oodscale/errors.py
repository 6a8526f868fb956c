"""A user's mistakes, told apart from bugs, and the one a user should see when a stage fails.

Every error that says what the user gave wrong and what to do derives from `UserError`
(`ConfigError`, `ShardError`, `StorageError`, `LockedError`, `InputError`, `MissingError`,
`SetupError`): the CLI prints its message in one line. Anything else is a bug (torch's
RuntimeError for a shape or device mismatch, a KeyError, ...) and keeps its whole traceback.

An error raised in a Ray task, actor or Train worker reaches the driver wrapped (RayTaskError,
UserCodeException, TrainingFailedError, ...), its message a remote traceback; the user's error
is further down the chain, and `named_error` finds it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave or set up; its message names the thing and the fix."""


class InputError(UserError, ValueError):
    """A value, file or data set the user gave that cannot work."""


class MissingError(UserError, FileNotFoundError):
    """Something a stage needs is not there (a path, an earlier stage's output)."""


class SetupError(UserError, RuntimeError):
    """The environment lacks what was asked for (a package, a GPU, a Ray cluster)."""


# Python's own FileNotFoundError names the missing path, which is all a user needs
NAMED = (UserError, FileNotFoundError)


def _is_ray_wrapper(err: BaseException) -> bool:
    return type(err).__module__.startswith("ray.")


def _causes(err: BaseException) -> list[BaseException]:
    """`err` and what caused it, outermost first (Ray's `cause`, then `__cause__`)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        failures = getattr(current, "worker_failures", None)  # Ray Train's WorkerGroupError
        nested = next(iter(failures.values()), None) if isinstance(failures, dict) else None
        current = (getattr(current, "cause", None) or nested or current.__cause__
                   or current.__context__)
    return chain


def named_error(err: BaseException) -> BaseException | None:
    """The innermost error of ours (or Python's own, e.g. a FileNotFoundError) behind `err`,
    None when there is none (a bug: let its traceback show)."""
    found = [e for e in _causes(err) if isinstance(e, NAMED) and not _is_ray_wrapper(e)]
    return found[-1] if found else None

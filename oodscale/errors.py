"""The error a user should see when a stage fails: ours, not Ray's wrapping of it.

An error raised in a Ray task, actor or Train worker reaches the driver wrapped (RayTaskError,
UserCodeException, TrainingFailedError, ...), its message a remote traceback. The named error
that says what is wrong and what to do (ShardError, StorageError, a ValueError naming a config
key) is further down the chain; the CLI prints that one.
"""

from __future__ import annotations

NAMED = (FileNotFoundError, ValueError, RuntimeError)


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

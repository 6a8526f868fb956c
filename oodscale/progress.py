"""One progress line per stage on the driver, including for work that runs in Ray Train workers.

A worker's per-epoch metrics reach the driver through a small named actor (the mailbox): rank 0
puts each epoch's metrics there, a driver thread drains it, moves the stage's bar and hands the
metrics to experiment tracking. Worker stdout stays in Ray's log files unless `--verbose`.

On a terminal the bar is tqdm's, redrawn in place. In a log (stderr not a TTY) there is no
carriage-return redraw: a plain line once at least `LOG_EVERY_S` seconds and a tenth of the
stage have passed, so a piped run stays short (at most ten lines a stage, however slow the
machine) and readable.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_EVERY_S = 60.0
MAILBOX = "oodscale-progress"  # one per Ray job namespace; a stage holds it while it trains
POLL_S = 0.5
_warned = False


class StageBar:
    """A stage's progress: `n` of `total` units plus a short status (loss, accuracy, ...)."""

    def __init__(self, desc: str, total: int, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.n, self.status = 0, ""
        self._tqdm = (tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
                      if sys.stderr.isatty() else None)
        self._last_line, self._last_n = time.monotonic(), 0

    def advance_to(self, n: int, status: str = "") -> None:
        self.n, self.status = min(n, self.total), status or self.status
        if self._tqdm is not None:
            self._tqdm.update(self.n - self._tqdm.n)
            if status:
                self._tqdm.set_postfix_str(status, refresh=False)
            return
        if (time.monotonic() - self._last_line >= LOG_EVERY_S
                and self.n - self._last_n >= self.total / 10):
            self._last_line, self._last_n = time.monotonic(), self.n
            print(f"[oodscale] {self.desc}: {self.n}/{self.total} {self.unit}s"
                  f"{'  ' + self.status if self.status else ''}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def track(items: Iterable[T], desc: str, total: int, unit: str,
          size: Callable[[T], int] = lambda _: 1) -> Iterator[T]:
    """`items` unchanged, moving one stage bar by `size(item)` per item."""
    bar = StageBar(desc, total, unit)
    try:
        for item in items:
            yield item
            bar.advance_to(bar.n + size(item))
    finally:
        bar.close()


class _Mailbox:
    """Ray actor: epoch metrics put by rank 0 of a worker group, taken by the driver."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def take(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items


def publish(label: str, metrics: dict[str, Any]) -> None:
    """From rank 0 of a worker group: one epoch's metrics to the driver's bar, if a stage
    opened a mailbox (`epoch_progress`); without one (a bare trainer in a test) nothing to do.

    Waits for the put so the last epoch arrives before the trainer returns; a lost mailbox is
    said once in the worker log and never stops training.
    """
    import ray

    global _warned
    try:
        mailbox = ray.get_actor(MAILBOX)
    except ValueError:
        return
    try:
        ray.get(mailbox.put.remote({"label": label, **metrics}), timeout=30)
    except (ray.exceptions.RayError, TimeoutError) as err:
        if not _warned:
            _warned = True
            print(f"[oodscale] progress mailbox unreachable ({err}); training goes on",
                  flush=True)


def _status(item: dict[str, Any]) -> str:
    parts = [item["label"]] if item.get("label") else []
    if isinstance(item.get("loss"), float):
        parts.append(f"loss {item['loss']:.4f}")
    if isinstance(item.get("train_acc"), float):
        parts.append(f"acc {item['train_acc']:.1f}%")
    return " ".join(parts)


@contextmanager
def epoch_progress(desc: str, epochs: int,
                   on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Iterator[None]:
    """A bar of `epochs` epochs (summed over the runs: a fine-tuned cell trains fewer) for the
    worker groups trained inside the block.

    Each item is a worker's `publish`: {"label", "epoch", metrics...}. The bar stands at the
    sum over labels of (last epoch + 1), so a resumed run starts where its checkpoint was.
    `on_epoch` sees every item on the driver (experiment tracking logs it).
    """
    import ray

    if epochs == 0:  # nothing left to train
        yield
        return
    mailbox = _open_mailbox()
    bar = StageBar(desc, epochs, "epoch")
    done: dict[str, int] = {}
    stop = threading.Event()
    failed: list[BaseException] = []
    lost: list[BaseException] = []

    def drain() -> None:
        if lost:
            return
        try:
            items = ray.get(mailbox.take.remote())
        except ray.exceptions.RayActorError as err:  # the display is lost, not the stage
            lost.append(err)
            print(f"[oodscale] {desc}: progress display lost ({type(err).__name__}); the stage "
                  "goes on", file=sys.stderr, flush=True)
            return
        for item in items:
            done[item.get("label", "")] = int(item.get("epoch", 0)) + 1
            bar.advance_to(sum(done.values()), _status(item))
            if on_epoch is not None:
                on_epoch(item)

    def poll() -> None:
        try:
            while not stop.wait(POLL_S):
                drain()
        except Exception as err:  # raised in the stage's thread once training has finished
            failed.append(err)

    thread = threading.Thread(target=poll, name="oodscale-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            if not failed:
                drain()
        finally:
            bar.close()
            ray.kill(mailbox)
    if failed:
        raise RuntimeError(f"progress/tracking of {desc} failed: {failed[0]}") from failed[0]


def _open_mailbox():
    """The named mailbox actor, on the driver's own node: on any other node it would die with
    that node (a node lost mid-stage). The previous stage's may still be releasing the name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            return ray.remote(num_cpus=0)(_Mailbox).options(
                name=MAILBOX, scheduling_strategy=here).remote()
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

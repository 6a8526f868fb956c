"""Where a benchmark run is recorded: one file `bench/results/<bench>_<machine>_<date>.md`.

A run is a record, never an edit of a reference page (docs/benchmarks.md quotes the current
figures and links the records). `OODSCALE_MACHINE` names the machine (default `cpu<cores>`,
e.g. `cpu2`; `h100` or `h200` on a lent GPU host).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name() -> str:
    return os.environ.get("OODSCALE_MACHINE", f"cpu{os.cpu_count()}")


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=RESULTS.parent)
    return done.stdout.strip() or "unknown (not a git checkout)"


def write_record(bench: str, command: str, body: str) -> Path:
    """A new record file holding the command, commit, date and machine, then `body`; a second
    run of the same day gets `_2`, `_3`, ..."""
    now = dt.datetime.now(dt.timezone.utc)
    stem = f"{bench}_{machine_name()}_{now:%Y-%m-%d}"
    path, n = RESULTS / f"{stem}.md", 1
    while path.exists():
        n += 1
        path = RESULTS / f"{stem}_{n}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {bench}, {machine_name()}, {now:%Y-%m-%d %H:%M} UTC\n\n"
                    f"- command: `{command}`\n- commit: `{git_commit()}`\n"
                    f"- machine: {machine_name()}\n\n{body.rstrip()}\n")
    return path

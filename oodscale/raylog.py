"""How much of Ray reaches the terminal: our stage lines and bars by default, everything with
`--verbose`.

By default worker and actor output (Ray Train's controller and workers, Ray Data's operators)
stays in Ray's log files (`log_to_driver=False`), the driver's `ray` logger shows warnings and
errors only, and Ray Data's driver-side INFO lines ("Starting execution of Dataset ...",
"Execution plan ...") stay in ray-data.log; the log directory is printed once instead.
"""

from __future__ import annotations

import logging
from typing import Any

# Ray Train V2 patches `print` in its workers to log through the root logger, which forwards
# the line once through its console handler and once more through the redirected stdout:
# every worker line reached the driver twice. Unpatched, a print goes to stdout once.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def init_options(verbose: bool) -> dict[str, Any]:
    """The `ray.init` keywords that decide what reaches the driver's terminal."""
    return {"log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.WARNING}


def after_init(verbose: bool, address: str | None) -> None:
    """Quiet Ray Data's driver-side console (its files keep every level) and say once which
    cluster this is (`address`: joined; None: started here) and where its logs are."""
    if verbose:
        return
    import ray
    import ray.data  # configures the `ray.data` logger, whose handlers are adjusted below

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
    # "Progress bars disabled": the stage bars are ours (oodscale.progress)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    node = ray._private.worker._global_node
    where = node.get_logs_dir_path() if node is not None else "the cluster's session logs"
    cluster = f"joined the Ray cluster at {address}" if address else "started a local Ray"
    print(f"[oodscale] {cluster}; Ray's own logs (workers, Ray Train, Ray Data): {where} "
          "(--verbose shows them here)", flush=True)

"""Shared fixtures: one real local Ray cluster per test session, sized for a 2-core machine."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with more logical CPUs than cores so fractional workers never starve."""
    import ray

    ray.init(num_cpus=4, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, ray_cluster):
    """The clean tiny run (prepare, train-diffusion, generate) the fault tests compare with."""
    from tests.faults import build_reference

    return build_reference(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="session")
def digits_experiment(tmp_path_factory, ray_cluster):
    """The small trained digits experiment (tests/experiment.py): (root, overrides)."""
    from tests.experiment import build_experiment

    return build_experiment(tmp_path_factory.mktemp("digits_experiment"))

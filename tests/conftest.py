"""Shared fixtures: one real local Ray cluster per test session, sized for a 2-core machine."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# The S3 server of the tests (s3_root) takes any key; these keep real credentials of the shell
# away from it and keep the AWS SDK from asking an instance-metadata endpoint for others. Set
# before the session's Ray starts, so its workers see them too.
os.environ.update(AWS_ACCESS_KEY_ID="oodscale-test", AWS_SECRET_ACCESS_KEY="oodscale-test",
                  AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)


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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on loopback for the session: `s3_server(name)`
    makes a bucket and returns an `s3://` storage root in it that every process can open."""
    import logging
    import uuid

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()

    def root(name: str) -> str:
        bucket = f"{name}-{uuid.uuid4().hex[:8]}".lower()
        uri = f"s3://{bucket}/root?endpoint_override={host}:{port}&scheme=http"
        pafs.FileSystem.from_uri(f"{uri}&allow_bucket_creation=true")[0].create_dir(bucket)
        return uri

    yield root
    server.stop()

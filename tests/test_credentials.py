"""Credentials stay in the environment: a location holding user info or a secret query key is
refused where the config is read, saying where credentials go, without repeating the secret
(`pytest -k redact`)."""

from __future__ import annotations

import pytest

from oodscale.config import ConfigError, load_config
from oodscale.runtime import init_ray
from tests.support import CONFIG

SECRET = "wJalrXUtnFEMI-K7MDENG"

LEAKY = {
    "storage.root": f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs",
    "tracking.mlflow_uri": f"https://me:{SECRET}@mlflow.example:5000",
    "data.path": f"gs://me:{SECRET}@bucket/images",
    "ray.address": f"ray://me:{SECRET}@head.example:10001",
}


@pytest.mark.parametrize("key", sorted(LEAKY))
def test_redact_user_info_in_a_location_is_refused(key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [f"{key}={LEAKY[key]}"])
    message = str(err.value)
    assert key in message and "user info" in message
    assert "AWS_ACCESS_KEY_ID" in message and "environment" in message
    assert SECRET not in message


@pytest.mark.parametrize("location", [
    f"s3://bucket/runs?endpoint_override=minio:9000&secret_key={SECRET}",
    "s3://bucket/runs?access_key=AKIA&region=eu-west-1",
    f"gs://bucket/runs?access_token={SECRET}",
])
def test_redact_secret_query_keys_are_refused(location):
    with pytest.raises(ConfigError, match="query key") as err:
        load_config(CONFIG, [f"storage.root={location}"])
    assert SECRET not in str(err.value)


def test_redact_ood_flag_and_bare_ray_address_are_checked():
    with pytest.raises(ConfigError, match="user info"):
        load_config(CONFIG, extra_ood=[f"mine=s3://k:{SECRET}@bucket/ood"])
    with pytest.raises(ConfigError, match="user info"):
        load_config(CONFIG, [f"ray.address=me:{SECRET}@10.0.0.1:6379"])


def test_redact_locations_without_credentials_pass(tmp_path):
    cfg = load_config(CONFIG, [
        f"storage.root={tmp_path}/runs@v2",  # `@` is a legal character of a local path
        "data.path=s3://bucket/images?endpoint_override=127.0.0.1:9000&scheme=http",
        "tracking.mlflow_uri=http://mlflow.example:5000", "ray.address=10.0.0.1:6379"])
    assert cfg.storage.root.endswith("runs@v2")


def test_redact_ray_address_from_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"ray://me:{SECRET}@head.example:10001")
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN") as err:
        init_ray(load_config(CONFIG))
    assert SECRET not in str(err.value)

"""Every RayJob entry point in the manifests must be a valid oodscale command line."""

from __future__ import annotations

import shlex

import pytest

from oodscale.cli import STAGES, _parser, _split_rest
from oodscale.config import load_config
from tests.kustomize import PROFILES, rendered
from tests.support import REPO


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_entrypoints_parse_and_validate(profile):
    jobs = [o for o in rendered(profile) if o["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:1] == ["python"] and argv[1].startswith("jobs/"), argv
        script = REPO / argv[1]
        assert script.is_file(), argv[1]
        stage = script.read_text().split('job_main("')[1].split('")')[0]
        assert stage in STAGES
        args = _parser(stage).parse_intermixed_args(argv[2:])
        config, overrides = _split_rest(args.config, args.rest)
        load_config(REPO / config, overrides)  # raises ConfigError naming the key

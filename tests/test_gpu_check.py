"""The GPU check script itself, where there is no GPU: its config is valid, it refuses to run
without CUDA, and `--smoke` runs every timing case once on the CPU."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from oodscale.classify.grid import grid
from oodscale.classify.loss_table import LOSS_NAMES
from oodscale.config import load_config
from tests.support import DIGITS, REPO


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_pipeline_config_covers_every_source_and_score_with_every_gpu_flag(gpu_check, tmp_path):
    cfg = load_config(DIGITS, [f"storage.root={tmp_path}", *gpu_check.PIPELINE])
    assert {spec.outliers for spec in grid(cfg)} == set(gpu_check.SOURCES)
    assert set(cfg.evaluate.scores) == set(gpu_check.SCORE_NAMES)
    assert cfg.diffusion.use_gpu and cfg.generate.use_gpu and cfg.train.use_gpu
    assert cfg.evaluate.use_gpu
    assert cfg.diffusion.mixed_precision == cfg.train.mixed_precision == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_check_says_so_and_exits_2(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_smoke_runs_every_timing_case_on_the_cpu(gpu_check, tmp_path):
    from accelerate.state import AcceleratorState

    out = tmp_path / "check.md"
    try:
        assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    finally:
        AcceleratorState._reset_state(True)
    table = out.read_text()
    assert "FAILED" not in table and "skipped" not in table
    for case in ("sampling: cifar10 UNet", "sampling: imagenet UNet", "DDPM train step",
                 "sampling: DiT-XL/2 + VAE decode",
                 "wrn40_2@32, arcface", "resnet50@64, arcface", "resnet50@224, arcface",
                 "evaluate forward", "kNN + Mahalanobis",
                 "torch.compile default", "torch.compile reduce-overhead"):
        assert case in table, case
    for loss in LOSS_NAMES:
        assert f"wrn40_2@32, {loss}" in table, loss


def test_an_isolated_case_comes_back_from_its_child_process(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check.RUN, "smoke", True)
    row = gpu_check.run_isolated("eval bf16", timeout_s=120)
    assert (row.case, row.status) == ("evaluate forward: wrn40_2@32", "ok")
    assert row.value.endswith("images/s") and row.bound == "n/a (CPU)"


def test_an_isolated_case_that_dies_costs_its_row_not_the_table(gpu_check, monkeypatch):
    # The compile rows run in a child process (one died with SIGSEGV on an H100); a child that
    # fails before it announces a row must come back as a FAILED row naming its exit.
    monkeypatch.setattr(gpu_check.RUN, "smoke", True)
    row = gpu_check.run_isolated("no such case", timeout_s=120)
    assert row.case == "no such case"
    assert row.status == "FAILED (child process: exit 2)"


def test_only_refuses_an_unknown_case_and_names_the_valid_ones(gpu_check, capsys):
    assert gpu_check.main(["--smoke", "--only", "oe wrn40_2,oe wrn40_2 turbo"]) == 2
    err = capsys.readouterr().err
    assert "'oe wrn40_2 turbo'" in err and "oe wrn40_2 backbone CUDA graphs" in err


def test_every_compile_row_and_only_those_runs_in_a_child(gpu_check):
    names = [name for name, _ in gpu_check.throughput_cases()]
    compile_rows = [n for n in names if "compiled" in n or "CUDA graphs" in n]
    assert len(compile_rows) == 6
    assert [n for n in names if gpu_check.isolated(n)] == compile_rows

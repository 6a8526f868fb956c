"""bf16 (the GPU scale-out setting) through Accelerate, checked on the CPU autocast path."""

import pytest
import torch

from oodscale.classify.loss_table import LOSS_NAMES
from oodscale.classify.losses import kl_to_uniform
from oodscale.classify.models import build_classifier
from oodscale.distributed import make_accelerator


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; each Ray Train worker builds one Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_bf16_oe_step_is_finite_and_updates_weights(loss):
    accelerator = make_accelerator("bf16", use_gpu=False)
    torch.manual_seed(0)
    model = build_classifier("smallcnn", loss, 1, 16, 6, 16, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(12, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])  # rows 8-11 are outliers
    with accelerator.autocast():
        logits, _, id_loss = model(x, y)
        loss_value = id_loss + 0.5 * kl_to_uniform(logits[8:].float())
    accelerator.backward(loss_value)
    optimizer.step()
    assert torch.isfinite(loss_value)
    after = list(model.parameters())
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))


def test_fp16_on_cpu_falls_back_to_fp32():
    assert make_accelerator("fp16", use_gpu=False).mixed_precision == "no"


@pytest.mark.parametrize("setting", ["auto", "no", "bf16"])
def test_sampling_precision_follows_generate_mixed_precision(setting):
    from oodscale.devices import computes_bf16_natively
    from oodscale.diffusion.sample import sampling_autocast

    cpu = torch.device("cpu")
    expected = {"no": False, "bf16": True, "auto": computes_bf16_natively(cpu)}[setting]
    with sampling_autocast(cpu, setting):
        assert torch.is_autocast_enabled("cpu") is expected
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bf16_sampling_draws_nearly_the_fp32_images():
    """bf16 is a speed setting, not a method change: the same noise gives nearly the same
    images (a pixel moves by a small fraction of the [-1, 1] range on average)."""
    from oodscale.diffusion.model import LabelConditionedUNet, UNetGenerator
    from oodscale.diffusion.sample import sample_images, sampling_autocast
    from oodscale.diffusion.samplers import make_sampler

    torch.manual_seed(0)
    model = UNetGenerator(LabelConditionedUNet(3, 8, 1, (8, 8)).eval(), 1000)
    labels = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    images = {}
    for setting in ("no", "bf16"):
        with sampling_autocast(torch.device("cpu"), setting):
            images[setting] = sample_images(model, labels, 3.0, make_sampler("ddim", 1000, 10),
                                            torch.Generator().manual_seed(1))
    assert images["bf16"].dtype == torch.float32
    other_noise = sample_images(model, labels, 3.0, make_sampler("ddim", 1000, 10),
                                torch.Generator().manual_seed(2))
    moved = (images["bf16"] - images["no"]).abs().mean()
    assert 0 < moved < 0.1 * (other_noise - images["no"]).abs().mean()


def test_an_explicit_sampling_precision_is_a_generation_parameter():
    """A rerun must not resume shards drawn in another precision; "auto" adds no key, so runs
    from before the option still resume."""
    from oodscale.config import ExperimentConfig
    from oodscale.diffusion.generate import _generation_params

    card = {"model_hash": "abc", "generator": "ddpm"}
    base = {"name": "t"}
    auto = _generation_params(ExperimentConfig.model_validate(base), card, [0, 1])
    assert "mixed_precision" not in auto
    no = _generation_params(ExperimentConfig.model_validate(
        {**base, "generate": {"mixed_precision": "no"}}), card, [0, 1])
    assert no == {**auto, "mixed_precision": "no"}

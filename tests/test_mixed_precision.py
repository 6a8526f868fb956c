"""bf16 (the GPU scale-out setting) through Accelerate, checked on the CPU autocast path."""

import pytest
import torch

from oodscale.classify.losses import LOSS_NAMES, kl_to_uniform
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

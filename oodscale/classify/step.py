"""One OE training step and the epoch around it, shared by the Ray Train loop, the benchmarks
and the GPU check.

ID rows and outlier rows go through one forward pass (BatchNorm sees both); loss =
L_id(ID rows) + λ_oe · KL(U ‖ softmax(logits of outlier rows)). The step returns its figures as
one detached tensor on the device, so a loop sums them there and reads them once per epoch:
an `.item()` per step would make the host wait for the GPU every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from oodscale.classify.losses import kl_to_uniform
from oodscale.data.streams import to_model_input

STEP_FIGURES = ("loss", "id_loss", "oe_loss", "correct")


def oe_step(model, optimizer, accelerator, x_id: torch.Tensor, y_id: torch.Tensor,
            outliers: torch.Tensor | None, lambda_oe: float) -> torch.Tensor:
    """Update the model once; returns (loss, id_loss, oe_loss, ID accuracy) on the device."""
    n_id = len(y_id)
    x = x_id if outliers is None else torch.cat([x_id, outliers])
    with accelerator.autocast():
        logits, _, id_loss = model(x, y_id)
        oe_loss = kl_to_uniform(logits[n_id:].float())
        loss = id_loss + lambda_oe * oe_loss
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    correct = (logits[:n_id].argmax(1) == y_id).float().mean()
    return torch.stack([loss.float(), id_loss.float(), oe_loss.float(), correct]).detach()


def train_epoch(model, optimizer, accelerator, lr_schedule, id_batches: Iterator[dict],
                outliers, steps: int, lambda_oe: float,
                augment: Callable[[torch.Tensor | None], torch.Tensor | None] | None = None,
                augment_outliers: Callable[[torch.Tensor | None], torch.Tensor | None] | None
                = None) -> dict[str, float]:
    """`steps` OE steps; the figures are summed on the device and read once, at the end.

    `outliers` is the cell's `OutlierStream`; `augment` (a `classify.augment.Augment`) is
    applied to the ID rows and `augment_outliers` (default: the same) to the outlier rows,
    after the outliers are drawn from the unaugmented ID batch. Two streams keep paired cells
    paired: the ID rows' crops and flips do not depend on how many outlier rows were drawn.
    The Ray Train loop and the plain-loop benchmark both run this, so what they time is the
    same work."""
    model.train()
    sums = torch.zeros(len(STEP_FIGURES), device=accelerator.device)
    started, rows = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(id_batches)
        x, y = to_model_input(batch["image"]), batch["label"]
        x_out = outliers.next(x, y)
        if augment is not None:
            x, x_out = augment(x), (augment_outliers or augment)(x_out)
        sums += oe_step(model, optimizer, accelerator, x, y, x_out, lambda_oe)
        lr_schedule.step()
        rows += len(y)
    metrics = dict(zip(STEP_FIGURES, (sums / steps).tolist(), strict=True))  # one sync
    metrics.update(train_acc=100 * metrics.pop("correct"),
                   images_per_s=rows / (time.perf_counter() - started))
    return metrics

"""Where tensors live inside a worker: the one place batches and models meet their device.

On a GPU worker every tensor a step touches must be on the worker's device. A tensor built with
`torch.full(...)` or `torch.randn(...)` without `device=` lands on the CPU, and the first
`torch.cat` with a batch on the GPU crashes; CPU-only runs never see it. So workers take their
device from `worker_device`, get their training batches on it from `data.streams.RankData`
(Ray Data's `iter_torch_batches(device=...)`, set explicitly), and build step-time tensors with
`device=` (random ones from `device_generator`). tests/device_sim.py checks this on the CPU.
"""

from __future__ import annotations

import torch

from oodscale.errors import SetupError


def worker_device(use_gpu: bool) -> torch.device:
    """The device of a Ray actor or task that asked for `num_gpus=1` when `use_gpu`.

    Asking for a GPU on a worker that sees none is an error, not a silent CPU fallback: the
    run would otherwise be 10-100x slower than planned with nothing said.
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SetupError("this worker was scheduled as a GPU worker but torch sees no CUDA "
                           "device; check the node's drivers (nvidia-smi) and that torch is a "
                           "CUDA build, or set the stage's use_gpu=false")
    return torch.device("cuda", torch.cuda.current_device())


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether bf16 matmuls/convolutions run in hardware here: CUDA GPUs from Ampere on, CPUs
    with AVX-512 BF16 or AMX (oneDNN's check). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check and check())
    return False


def device_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A random generator on `device`, so step-time noise is drawn where it is used."""
    return torch.Generator(device=device).manual_seed(seed)

"""A CPU stand-in for a GPU worker: fails where a real GPU would on a cross-device op.

On a GPU worker, batches arrive on the GPU, while any tensor built without `device=` lands on
the CPU; the first op mixing the two crashes ("Expected all tensors to be on the same
device"). A CPU-only test cannot see that, because both really are on the CPU. This
`TorchFunctionMode` tracks where each tensor *would* be and raises the same error:

* host: tensors from factory calls without a device (`torch.full(...)`, `torch.randn(...,
  generator=cpu_gen)`, `torch.from_numpy`), results of `.cpu()`, model parameters until the
  model is moved, and whatever is computed from host tensors alone;
* device: tensors made with an explicit `device=`, moved with `.to(device)`, made outside the
  mode (Ray Data's threads, autograd's gradients), and whatever is computed from them.

An op that mixes a device tensor with a host tensor of one or more dimensions raises, as CUDA
does (0-dim host tensors are allowed: CUDA takes CPU scalars). Indexing, `copy_` and `.to`
are allowed across devices, as on CUDA. It is looser only for tensors it cannot see being
made. One thing cannot be simulated: code that compares devices (`x.device != y.device`) sees
"cpu" twice. pytorch-metric-learning's `to_device` does that to move its constants lazily; on
a GPU it always moves them, so inside the mode it always does.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.utils import common_functions as pml_functions
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_TO_HOST = {torch.Tensor.cpu}
_CROSS_DEVICE_OK = {torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__,
                    torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item}


def _pml_to_device_on_a_gpu(x, tensor=None, device=None, dtype=None):
    """pytorch-metric-learning's `to_device` as it behaves when the devices differ."""
    x = x.to(device if device is not None else tensor.device)
    return x if dtype is None else pml_functions.to_dtype(x, dtype=dtype)


class SimulatedAccelerator(TorchFunctionMode):
    """Track host vs device per tensor; raise on ops that would cross devices on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self._where = WeakTensorKeyDictionary()  # tensor -> "host" | "device"
        self._pml_to_device = pml_functions.to_device

    def __enter__(self):
        pml_functions.to_device = _pml_to_device_on_a_gpu
        return super().__enter__()

    def __exit__(self, *exc):
        pml_functions.to_device = self._pml_to_device
        return super().__exit__(*exc)

    def on_device(self, tensor: torch.Tensor) -> bool:
        where = self._where.get(tensor)
        if where is not None:
            return where == "device"
        return not isinstance(tensor, torch.nn.Parameter)  # models are built on the host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func not in _MOVES and func not in _TO_HOST and func not in _CROSS_DEVICE_OK:
            self._check(func, inputs)
        out = func(*args, **kwargs)
        where = self._placement(func, args, kwargs, inputs)
        if where is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._where[t] = where
        return out

    def _check(self, func, inputs: list[torch.Tensor]) -> None:
        device = [t for t in inputs if self.on_device(t)]
        host = [t for t in inputs if not self.on_device(t) and t.dim() > 0]
        if device and host:
            name = getattr(func, "__name__", str(func))
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but {name} got a host tensor "
                f"of shape {tuple(host[0].shape)} beside device tensors (simulated accelerator:"
                f" a tensor built without device= or not moved to the worker's device)")

    def _placement(self, func, args, kwargs, inputs: list[torch.Tensor]) -> str | None:
        if func in _TO_HOST:
            return "host"
        if func in _MOVES:
            target = kwargs.get("device")
            if target is None and func is torch.Tensor.cuda:
                target = "cuda"
            for a in args[1:]:
                if isinstance(a, torch.Tensor):
                    return "device" if self.on_device(a) else "host"
                if isinstance(a, (torch.device, str)):
                    target = a
            if target is not None:
                return "device"
            return "device" if self.on_device(args[0]) else "host"
        if inputs:
            return "device" if any(self.on_device(t) for t in inputs) else "host"
        return "host" if kwargs.get("device") is None else "device"

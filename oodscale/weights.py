"""Model weights are read from safetensors files only.

A pickle (`torch.save`, a `.pt`/`.bin` file) can run code when it is loaded, and a checkpoint
from elsewhere may be one renamed; it is refused by name rather than unpickled.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from oodscale.errors import InputError, MissingError

PICKLE_PROTOCOL_MARK = b"\x80"  # the first byte of a pickle stream of protocol 2 or later


def require_safetensors(path: Path) -> None:
    """Refuse, by name, a missing file, a pickle or anything else that is not safetensors (the
    header is parsed; the tensors are not read)."""
    if not path.is_file():
        raise MissingError(f"{path} missing: oodscale reads weights from safetensors files "
                                f"only; rerun the stage that writes it")
    with path.open("rb") as f:
        head = f.read(1)
    if head == PICKLE_PROTOCOL_MARK or zipfile.is_zipfile(path):
        raise InputError(f"{path} is a pickle (torch.save), not safetensors; oodscale never "
                         f"unpickles weights. Convert it with safetensors.torch.save_file("
                         f"state_dict, ...) or retrain")
    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as err:
        raise InputError(f"{path} is not a readable safetensors file ({err}); rerun the stage "
                         f"that writes it") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after `require_safetensors`."""
    require_safetensors(path)
    return load_file(str(path))

"""The built-in OOD sets `data.ood_sets` and `data.val_ood_sets` may name: one table the config
validates against.

It imports nothing heavy; each row names the function in `oodscale.data.builtin` that draws
its images, imported on use. Adding a set: its function and one row.
"""

from __future__ import annotations

from dataclasses import dataclass

from oodscale.errors import InputError


@dataclass(frozen=True)
class OODSetSpec:
    """One row of the table."""

    draw: str  # "module:function(oodscale.data.builtin.OODRequest) -> N×H×W×C uint8"
    # made here (crops, noise): exactly the requested count, data.generated_ood_samples by
    # default; else real images: every one its pool holds unless data.ood_samples caps it
    made_here: bool
    # a validation counterpart disjoint from the test images: real images the test set did
    # not draw, or noise of another seed (crops would repeat the test sets' source images)
    validation: bool
    held_out: bool = False  # drawn from the ID source's held-out classes (data.id_classes)


_DRAW = "oodscale.data.builtin"
OOD_SETS: dict[str, OODSetSpec] = {
    "textures": OODSetSpec(f"{_DRAW}:crop_set", made_here=True, validation=False),
    "photos": OODSetSpec(f"{_DRAW}:crop_set", made_here=True, validation=False),
    "gaussian": OODSetSpec(f"{_DRAW}:noise_set", made_here=True, validation=True),
    "uniform": OODSetSpec(f"{_DRAW}:noise_set", made_here=True, validation=True),
    "rademacher": OODSetSpec(f"{_DRAW}:noise_set", made_here=True, validation=True),
    "blobs": OODSetSpec(f"{_DRAW}:noise_set", made_here=True, validation=True),
    "openset": OODSetSpec(f"{_DRAW}:openset_set", made_here=False, validation=True,
                          held_out=True),
    "digits": OODSetSpec(f"{_DRAW}:digits_set", made_here=False, validation=True),
}


def check_ood_set(name: str, validation: bool = False) -> str:
    """`name` if the table has it (with a validation counterpart, where `validation`), else an
    error listing the valid names."""
    valid = [n for n, spec in OOD_SETS.items() if spec.validation or not validation]
    if name not in valid:
        kind = "built-in OOD validation set" if validation else "built-in OOD set"
        raise InputError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")
    return name

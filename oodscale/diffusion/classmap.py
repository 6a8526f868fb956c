"""ID classes → a generator's class indices, by name.

The ID data names its classes by directory (ImageNet: wnids such as n01440764); a generator
names its own (the DDPM: the ID classes it was trained on; an ImageNet DiT: 1000 classes in
index order). Label-mixup draws pairs of ID classes and conditions the generator on their
indices there, so an ID subset such as ImageNet-200 borrows the full model. A class the
generator does not know is refused, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from oodscale.errors import InputError, MissingError


def read_class_list(path: str | Path) -> list[str]:
    """Class names in index order, one per line; the first word is the name, so ImageNet's
    LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca") gives the wnids."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingError(f"generate.class_list={str(path)!r}: no such file (one class "
                                f"name per line, in the generator's index order)")
    names = [line.split()[0] for line in file.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise InputError(f"generate.class_list {path} names a class twice")
    return names


def generator_class_names(class_list: str | None, weights_dir: Path,
                          num_classes: int) -> list[str]:
    """The generator's class names: the class list file if given, else the pipeline's own
    `id2label` (model_index.json, as DiTPipeline saves it)."""
    if class_list:
        names = read_class_list(class_list)
    else:
        index = Path(weights_dir) / "model_index.json"
        id2label = json.loads(index.read_text()).get("id2label") if index.is_file() else None
        if not id2label:
            raise InputError(f"the generator at {weights_dir} names no classes (no id2label in "
                             f"model_index.json): set generate.class_list to a file of its "
                             f"class names in index order (ImageNet: LOC_synset_mapping.txt)")
        names = [id2label[str(i)] for i in range(num_classes)]
    if len(names) != num_classes:
        raise InputError(f"the generator has {num_classes} classes but its class list names "
                         f"{len(names)}; give the list of exactly its classes, in index order")
    return names


def map_classes(id_names: list[str], generator_names: list[str]) -> list[int]:
    """The generator index of each ID class; a name matches a generator name or one of its
    comma-separated synonyms ("tench, Tinca tinca")."""
    index: dict[str, int] = {}
    for i, name in enumerate(generator_names):
        for alias in [name, *(part.strip() for part in name.split(","))]:
            index.setdefault(alias, i)
    unknown = [name for name in id_names if name not in index]
    if unknown:
        raise InputError(f"{len(unknown)} ID class(es) unknown to the generator, e.g. "
                         f"{unknown[:5]}; the ID classes must be among its classes (check "
                         f"data.path's class directories and generate.class_list)")
    return [index[name] for name in id_names]


def to_generator_labels(labels: torch.Tensor, class_map: list[int],
                        num_classes: int) -> torch.Tensor:
    """Soft labels over the ID classes (B×C_id) → over the generator's classes (B×C_gen)."""
    out = labels.new_zeros(len(labels), num_classes)
    return out.index_add_(1, labels.new_tensor(class_map, dtype=torch.long), labels)

"""What a published classifier's directory holds, and which classifiers are finished.

Light on purpose (no torch): `oodscale status` and `predict`'s listing read it.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from oodscale.runtime import Storage

WEIGHTS = "model.safetensors"
CARD = "classifier.json"  # written last: its presence means the run finished


def trained_runs(storage: Storage, classifiers_dir: str) -> list[str]:
    """Names of the finished classifiers (those with a card) under `classifiers_dir`, sorted:
    this grid's and any earlier grid's of the same experiment."""
    if not storage.exists(classifiers_dir):
        return []
    infos = storage.fs.get_file_info(pafs.FileSelector(classifiers_dir))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and storage.exists(f"{i.path}/{CARD}"))

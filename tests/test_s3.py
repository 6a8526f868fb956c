"""The storage root on a real S3-compatible server (moto's, started by the `s3_server` fixture
on loopback): publishing without directory moves, a publish killed midway, the lock."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from oodscale.classify.checkpoints import CARD, WEIGHTS, trained_runs
from oodscale.distributed import publish_dir
from oodscale.runtime import open_storage


def _model_dir(path: Path, version: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS).write_bytes(version.encode() * 1000)
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "extra.bin").write_bytes(version.encode())
    (path / CARD).write_text(f'{{"version": "{version}"}}')
    return path


def _files(storage, directory: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    infos = storage.fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    return {i.path[len(directory) + 1:]: storage.read_bytes(i.path) for i in infos
            if i.type == pafs.FileType.File}


def test_s3_publish_writes_final_names_card_last(s3_server, tmp_path):
    storage = open_storage(s3_server("publish"))
    destination = storage.path("digits", "classifiers", "run")
    publish_dir(storage, str(_model_dir(tmp_path / "v1", "one")), destination, last=(CARD,))
    assert _files(storage, destination) == {WEIGHTS: b"one" * 1000, "sub/extra.bin": b"one",
                                            CARD: b'{"version": "one"}'}
    # a second publish replaces the first whole, leaving no file of it behind
    source = _model_dir(tmp_path / "v2", "two")
    (source / "sub" / "extra.bin").unlink()
    publish_dir(storage, str(source), destination, last=(CARD,))
    assert _files(storage, destination) == {WEIGHTS: b"two" * 1000, CARD: b'{"version": "two"}'}


def test_no_directory_move_remains():
    """pyarrow's S3 and GCS filesystems cannot move a directory: nothing in oodscale tries."""
    root = Path(__file__).resolve().parents[1] / "oodscale"
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ".move(" in line:
                assert "# moves a file" in line, f"{path}:{number} moves a path: {line.strip()}"


KILLED_PUBLISH = """
import sys, time
import pyarrow.fs as pafs
from oodscale.distributed import publish_dir
from oodscale.runtime import open_storage
copy = pafs.copy_files
def slow_copy(source, destination, **kwargs):
    copy(source, destination, **kwargs)
    print("copied", destination, flush=True)
    time.sleep(120)  # killed here, after the first file
pafs.copy_files = slow_copy
publish_dir(open_storage(sys.argv[1]), sys.argv[2], sys.argv[3], last=("classifier.json",))
"""


def test_s3_publish_killed_midway_leaves_no_finished_model(s3_server, tmp_path):
    root = s3_server("killed")
    storage = open_storage(root)
    destination = storage.path("digits", "classifiers", "run")
    publish_dir(storage, str(_model_dir(tmp_path / "v1", "one")), destination, last=(CARD,))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISH, root,
                             str(_model_dir(tmp_path / "v2", "two")), destination],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("copied")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    files = _files(storage, destination)
    assert CARD not in files and files  # the card went first, some new files are there
    assert trained_runs(storage, storage.path("digits", "classifiers")) == []  # readers' view
    publish_dir(storage, str(tmp_path / "v2"), destination, last=(CARD,))  # the rerun
    assert _files(storage, destination)[CARD] == b'{"version": "two"}'
    assert trained_runs(storage, storage.path("digits", "classifiers")) == ["run"]

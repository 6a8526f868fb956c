from oodscale.cli import main
from tests.support import CONFIG


def test_bad_override_exits_2_naming_the_key(capsys):
    assert main(["prepare", CONFIG, "train.epocs=3"]) == 2
    assert "train.epocs" in capsys.readouterr().err


def test_stage_before_its_input_is_a_clear_error(tmp_path, capsys):
    assert main(["verify", CONFIG, f"storage.root={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "oodscale prepare" in err


def test_prepare_then_verify(tmp_path, capsys, ray_cluster):
    overrides = [f"storage.root={tmp_path}", "data.ood_sets=[openset,blobs]",
                 "data.ood_samples=10"]
    assert main(["prepare", CONFIG, *overrides]) == 0
    assert main(["verify", CONFIG, *overrides]) == 0
    assert "every checksum matches" in capsys.readouterr().out
    shard = tmp_path / "digits" / "data" / "ood" / "blobs" / "blobs-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-700])
    assert main(["verify", CONFIG, *overrides]) == 1
    assert "blobs-000000.tar" in capsys.readouterr().err


def test_file_uri_storage_root(tmp_path, capsys, ray_cluster):
    """A file:// root goes through the same pyarrow filesystem path as s3:// and gs://."""
    overrides = [f"storage.root=file://{tmp_path}", "data.ood_sets=[openset]",
                 "data.ood_samples=10"]
    assert main(["prepare", CONFIG, *overrides]) == 0
    assert (tmp_path / "digits" / "data" / "id" / "train" / "manifest.json").is_file()
    assert main(["verify", CONFIG, *overrides]) == 0


def test_storage_resolves_uris(tmp_path):
    from oodscale.runtime import open_storage

    local = open_storage(f"file://{tmp_path}")
    assert local.base == str(tmp_path) and local.uri_of(local.path("x")) == f"{tmp_path}/x"
    plain = open_storage(str(tmp_path / "a" / ".." / "b"))
    assert plain.base == str(tmp_path / "b")

from pathlib import Path

from oodscale.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")


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

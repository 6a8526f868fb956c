
import pytest

from oodscale.config import ConfigError, load_config
from tests.support import DIGITS


def test_digits_config_loads_with_name_from_file():
    cfg = load_config(DIGITS)
    assert cfg.name == "digits"
    assert cfg.num_classes == 6
    assert cfg.train.losses == ["softmax", "arcface"]


def test_dotted_overrides_are_typed():
    cfg = load_config(DIGITS, ["train.epochs=3", "generate.lam.kind=beta", "train.lr=0.01",
                               "train.losses=[cosface]", "storage.root=s3://bucket/x"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.generate.lam.kind == "beta"
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.train.losses == ["cosface"]
    assert cfg.storage.root == "s3://bucket/x"


def test_a_bare_yaml_no_is_the_precision_no():
    """YAML reads `no` as False; the precision fields take it as the "no" it was written as."""
    cfg = load_config(DIGITS, ["train.mixed_precision=no", "generate.mixed_precision=no",
                               "diffusion.mixed_precision=bf16"])
    assert (cfg.train.mixed_precision, cfg.generate.mixed_precision) == ("no", "no")
    assert cfg.diffusion.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="generate.mixed_precision"):
        load_config(DIGITS, ["generate.mixed_precision=yes"])


@pytest.mark.parametrize("override, key", [
    ("train.epocs=3", "train.epocs"),          # unknown key
    ("train.epochs=many", "train.epochs"),     # wrong type
    ("train.epochs=0", "train.epochs"),        # impossible value
    ("data.test_fraction=1.5", "data.test_fraction"),
    ("train.losses=[softmax,bogus]", "train.losses.1"),
    ("generate.guidance=-1", "generate.guidance"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, [override])
    assert key in str(err.value)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, ["train.losses=[bogus]"])
    assert "arcface" in str(err.value) and "softmax" in str(err.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DIGITS, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_openset_requires_id_classes():
    with pytest.raises(ConfigError, match="id_classes"):
        load_config(DIGITS, ["data.id_classes=null"])


def test_unknown_data_source_lists_the_table():
    from oodscale.data.source_table import DATA_SOURCES

    with pytest.raises(ConfigError, match="data.source") as err:
        load_config(DIGITS, ["data.source=mnist"])
    assert all(name in str(err.value) for name in DATA_SOURCES)


@pytest.mark.parametrize("override, message", [
    (["data.source=cifar10"], "data.path is required"),  # the row needs a path
    (["data.source=fashion_mnist", "data.ood_sets=[digits]"], None),  # another source's set
    (["data.ood_sets=[digits]"], "ID data of data.source=digits"),
    (["train.augment.flip=true"], "mirrored digits image"),
])
def test_data_source_rows_drive_the_checks(override, message):
    if message is None:
        assert load_config(DIGITS, override).data.ood_sets == ["digits"]
        return
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, override)


def test_unknown_ood_sets_list_the_table():
    from oodscale.data.ood_table import OOD_SETS

    with pytest.raises(ConfigError, match="data.ood_sets.0") as err:
        load_config(DIGITS, ["data.ood_sets=[bogus]"])
    assert all(name in str(err.value) for name in OOD_SETS)
    with pytest.raises(ConfigError, match="validation set 'textures'"):  # crops have none
        load_config(DIGITS, ["data.val_ood_sets=[textures]"])
    cfg = load_config(DIGITS)
    assert cfg.data.validation_ood_sets == ["openset", "gaussian", "uniform", "rademacher",
                                            "blobs"]
    assert cfg.data.ood_set_size("openset", "ood") is None
    assert cfg.data.ood_set_size("textures", "ood") == cfg.data.generated_ood_samples

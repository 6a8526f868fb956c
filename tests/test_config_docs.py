"""docs/method.md's defaults table is rendered from the config (oodscale/config_docs.py), so it
cannot drift from the defaults, bounds and descriptions in oodscale/config.py."""

from __future__ import annotations

import pytest

from oodscale.config import load_config
from oodscale.config_docs import BEGIN, COMMAND, END, current_table, main, render_table, rows
from tests.support import DIGITS, REPO

METHOD = REPO / "docs" / "method.md"


def test_method_md_defaults_table_is_current():
    assert current_table(METHOD) == render_table(DIGITS), (
        f"docs/method.md's defaults table is out of date: run {COMMAND}")


def test_every_config_key_has_a_description():
    assert [row.key for row in rows() if not row.description] == []


def test_rows_read_types_bounds_and_defaults_as_the_config_has_them():
    by_key = {row.key: row for row in rows()}
    assert by_key["data.image_size"].kind == "int, in [8, 512]"
    assert by_key["data.test_fraction"].kind == "float, in (0, 1)"
    assert by_key["data.val_fraction"].kind == "float, in [0, 1)"
    assert by_key["ray.num_cpus"].kind == "int, in [1, 65,536], or null"
    assert by_key["train.seeds"].kind == "list of int, in [0, 4,294,967,295], at most 1,000 items"
    assert by_key["generate.mode"].kind == "one of `mix`, `sum`, `composed`"
    assert by_key["train.extra_cells[].losses"].kind == "list of str, non-empty"
    assert by_key["generate.lam"].kind == "section"
    assert by_key["name"].default == "required"
    assert by_key["train.seeds"].default == "`[0, 1, 2]`"
    assert by_key["data.extra_ood[].group"].default == "`far`"
    keys = list(by_key)
    assert keys.index("generate.lam") + 1 == keys.index("generate.lam.kind")  # section first


def test_the_example_column_shows_only_what_differs():
    by_key = {row.key: row for row in rows(example=load_config(DIGITS))}
    assert by_key["diffusion.lr"].example == "`0.001`"  # digits.yaml overrides 2e-4
    assert by_key["diffusion.timesteps"].example == ""  # digits.yaml keeps the default


def test_write_replaces_only_the_marked_block(tmp_path, capsys):
    doc = tmp_path / "method.md"
    doc.write_text(f"# Method\nbefore\n{BEGIN}\nstale\n{END}\nafter\n")
    assert main(["--write", str(doc), "--example", str(DIGITS)]) == 0
    head, table = doc.read_text().split(f"{BEGIN}\n")
    assert head == "# Method\nbefore\n"
    assert table == f"{render_table(DIGITS)}\n{END}\nafter\n"
    assert "updated" in capsys.readouterr().out
    main(["--write", str(doc), "--example", str(DIGITS)])
    assert capsys.readouterr().out == ""  # nothing to change the second time
    doc.write_text("no markers here\n")
    with pytest.raises(ValueError, match="defaults:begin"):
        main(["--write", str(doc), "--example", str(DIGITS)])

"""The defaults table of docs/method.md, rendered from the config models' fields.

The table is generated rather than written by hand, so that a default, bound or description
changed in oodscale/config.py reaches the docs with `make docs`
(`python -m oodscale.config_docs --write docs/method.md`); tests/test_config_docs.py fails while
the two disagree. Imports the config and pydantic only: no torch.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from oodscale.config import ExperimentConfig, load_config

BEGIN = "<!-- defaults:begin -->"
END = "<!-- defaults:end -->"
COMMAND = "make docs (python -m oodscale.config_docs --write docs/method.md)"
EXAMPLE = "configs/digits.yaml"  # the embedded experiment, whose values the table shows too
SECTION = "section"  # the kind of a row that heads a section's keys


@dataclass(frozen=True)
class Row:
    """One config key: its dotted path, default and the example's value where it differs
    (else "") as Markdown, type and bounds, and description."""

    key: str
    default: str
    example: str
    kind: str
    description: str


def _value(value: Any) -> str:
    """A value as it is written in YAML (the config files and dotted overrides)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return _value(value.model_dump())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _number(x: float) -> str:
    if isinstance(x, float) and not x.is_integer():
        return repr(x)
    return f"{int(x):,}"


def _strip(ann: Any) -> tuple[Any, list[Any]]:
    """`Annotated[T, ...]` -> (T, its constraints, from FieldInfo or annotated-types)."""
    if typing.get_origin(ann) is not typing.Annotated:
        return ann, []
    base, *extras = typing.get_args(ann)
    meta = [m for e in extras for m in (e.metadata if isinstance(e, FieldInfo) else [e])]
    return base, meta


def _bounds(meta: list[Any], sized: str) -> str:
    """Numeric bounds as an interval, length bounds in `sized` units, and a pattern."""
    low = next(((m.ge, "[") for m in meta if isinstance(m, at.Ge)), None) or next(
        ((m.gt, "(") for m in meta if isinstance(m, at.Gt)), None)
    high = next(((m.le, "]") for m in meta if isinstance(m, at.Le)), None) or next(
        ((m.lt, ")") for m in meta if isinstance(m, at.Lt)), None)
    parts = []
    if low and high:
        parts.append(f"in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}")
    elif low:
        parts.append(f"{'≥' if low[1] == '[' else '>'} {_number(low[0])}")
    elif high:
        parts.append(f"{'≤' if high[1] == ']' else '<'} {_number(high[0])}")
    for m in meta:
        if isinstance(m, at.MinLen) and m.min_length == 1:
            parts.append("non-empty")
        elif isinstance(m, at.MinLen):
            parts.append(f"at least {m.min_length:,} {sized}")
        elif isinstance(m, at.MaxLen):
            parts.append(f"at most {m.max_length:,} {sized}")
        elif getattr(m, "pattern", None):
            parts.append(f"matching `{m.pattern}`")
    return ", ".join(parts)


def _kind(ann: Any, meta: list[Any] | None = None) -> str:
    """A field's type and bounds in words, e.g. `int in [8, 512]`, `list of str`."""
    ann, inner = _strip(ann)
    meta = [*(meta or []), *inner]
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (rest,) = [a for a in args if a is not type(None)]
        return _kind(rest, meta) + ", or null"
    if origin is Literal:
        text, sized = "one of " + ", ".join(f"`{_value(a)}`" for a in args), ""
    elif origin is list and typing.get_origin(_strip(args[0])[0]) is Literal:
        text, sized = "list of any of " + _kind(args[0]).removeprefix("one of "), "items"
    elif origin is list:
        text, sized = f"list of {_kind(args[0])}", "items"
    elif origin is dict:
        text, sized = f"map of {_kind(args[0])} to {_kind(args[1])}", "entries"
    elif _section(ann):
        text, sized = "objects (keys below)", ""
    else:
        text, sized = ann.__name__, "characters"
    bounds = _bounds(meta, sized)
    return f"{text}, {bounds}" if bounds else text


def _section(ann: Any) -> type[BaseModel] | None:
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _items(ann: Any) -> type[BaseModel] | None:
    """The model of a list-of-objects field (data.extra_ood), else None."""
    if typing.get_origin(ann) is list:
        return _section(_strip(typing.get_args(ann)[0])[0])
    return None


def _default(info: FieldInfo) -> str | None:
    """The default in YAML, or None for a key without one."""
    if info.is_required():
        return None
    return _value(info.default_factory() if info.default_factory else info.default)


def rows(model: type[BaseModel] = ExperimentConfig, example: Any = None,
         prefix: str = "") -> Iterator[Row]:
    """Every key of `model`, sections before their keys, in declaration order; `example` is a
    config instance (or None) whose differing values fill Row.example."""
    for name, info in model.model_fields.items():
        key, section, items = f"{prefix}{name}", _section(info.annotation), _items(info.annotation)
        value = getattr(example, name) if example is not None else None
        if section:
            yield Row(key, "", "", SECTION, info.description or "")
            yield from rows(section, value, f"{key}.")
            continue
        default = _default(info)
        shown = _value(value) if example is not None else default
        yield Row(key, "required" if default is None else _code(default),
                  "" if shown == default else _code(shown),
                  _kind(info.annotation, list(info.metadata)), info.description or "")
        if items:
            yield from rows(items, None, f"{key}[].")


def _prose(text: str) -> str:
    """Text safe inside a Markdown table cell: no column breaks, HTML tags or emphasis."""
    for raw, escaped in (("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(raw, escaped)
    return text


def _code(text: str) -> str:
    """A value as code in a table cell: inside backticks only `|` needs escaping (GFM)."""
    return "`" + text.replace("|", "\\|") + "`" if text else ""


def render_table(example_path: str | Path = EXAMPLE) -> str:
    """The Markdown table of every config key, with the example experiment's values."""
    example = load_config(example_path)
    lines = [f"| key | default | {Path(example_path).name} | type and bounds | description |",
             "|---|---|---|---|---|"]
    for row in rows(ExperimentConfig, example):
        key = f"**`{row.key}`**" if row.kind == SECTION else f"`{row.key}`"
        cells = [key, row.default, row.example, row.kind.replace("|", "\\|"),
                 _prose(row.description)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split(text: str, where: str) -> tuple[str, str, str]:
    """(before BEGIN, between the markers, from END on); an error without both markers."""
    head, begin, rest = text.partition(BEGIN)
    body, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{where} has no {BEGIN} ... {END} block for the defaults table")
    return head + begin, body, end + tail


def current_table(path: str | Path) -> str:
    """The table between the markers of `path`, as written there."""
    return _split(Path(path).read_text(), str(path))[1].strip("\n")


def write_table(path: str | Path, table: str) -> bool:
    """Put `table` between the markers of `path`; True if the file changed."""
    path = Path(path)
    text = path.read_text()
    head, _, tail = _split(text, str(path))
    new = f"{head}\n{table}\n{tail}"
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="MARKDOWN",
                        help="write the table between the markers of this file (else print it)")
    parser.add_argument("--example", default=EXAMPLE,
                        help=f"experiment whose values fill the third column (default {EXAMPLE})")
    args = parser.parse_args(argv)
    table = render_table(args.example)
    if args.write is None:
        print(table)
    elif write_table(args.write, table):
        print(f"updated the defaults table of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

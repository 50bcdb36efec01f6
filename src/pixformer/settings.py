"""What the settings dataclasses (TrainConfig, Speed, the model and task configs) say about their fields,
read in one place:

    field_docs(TrainConfig)["lr"].help       # the comment beside the field (and the lines continuing it)
    field_docs(TrainConfig)["lr"].section    # the heading comment of the fields' group ("optimisation")
    require("lr", lr, lr > 0, "> 0")         # one line naming the option: "--lr must be > 0, got -1.0"
    check_type("betas", value, hint)         # the value against the field's type hint, floats finite

A field's help is its comment: `lr: float = 1e-3  # peak learning rate`, continued on comment lines
below it that are indented past the field or padded after the `#`. A comment line at the fields'
indentation, `# optimisation: ...`, heads the fields after it (a group of `pixformer train --help`).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from typing import Any

from .errors import PixformerError


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    help: str       # the field's comment, continuation lines joined ("" when it has none)
    section: str    # the heading comment above the field ("" when none)


def option(name: str) -> str:
    """A setting's command-line spelling: img_size -> --img-size."""
    return "--" + name.replace("_", "-")


def require(name: str, value: Any, ok: bool, rule: str) -> None:
    """A one-line error naming the option unless `ok`: '--lr must be > 0, got -1.0'."""
    if not ok:
        raise PixformerError(f"{option(name)} must be {rule}, got {value!r}")


@functools.cache
def field_docs(cls: type) -> dict[str, FieldDoc]:
    """Each field's help and section, read from the comments in the source of `cls` and of the dataclasses
    it inherits from (a subclass's own comment wins)."""
    docs: dict[str, FieldDoc] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and "__dataclass_fields__" in vars(klass):
            try:
                docs.update(_read_comments(klass))
            except (OSError, TypeError):         # no source (a class made at run time): no help
                pass
    return docs


def _read_comments(klass: type) -> dict[str, FieldDoc]:
    src = textwrap.dedent(inspect.getsource(klass))
    lines = src.splitlines()
    body = ast.parse(src).body[0].body
    fields = [n for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    if not fields:
        return {}
    indent = fields[0].col_offset
    field_at = {row: n.target.id for n in fields for row in range(n.lineno, n.end_lineno + 1)}
    comments = {t.start[0]: (t.start[1], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    first = body[0].end_lineno + 1 if isinstance(body[0], ast.Expr) else body[0].lineno   # after a docstring
    helps: dict[str, list[str]] = {}
    sections: dict[str, str] = {}
    current, section, heading_open = None, "", False
    for row in range(first, len(lines) + 1):
        code = lines[row - 1]
        col, text = comments.get(row, (None, ""))
        alone = col is not None and not code[:col].strip()
        if row in field_at:
            name = field_at[row]
            if name not in helps:
                helps[name], sections[name], current = [], section, name
            if col is not None:
                helps[name].append(text.lstrip("#").strip())
            heading_open = False
        elif alone:
            continues = col > indent or text.startswith("#  ")
            if current is not None and continues:
                helps[current].append(text.lstrip("#").strip())
            else:                                               # a heading (one or more lines)
                words = text.lstrip("#").strip()
                section = f"{section} {words}" if heading_open else words
                heading_open, current = True, None
        elif not code.strip():
            current, heading_open = None, False
        elif helps:                                             # code after the fields: a method
            break
    return {name: FieldDoc(" ".join(p for p in parts if p), sections[name]) for name, parts in helps.items()}


# ---- values against type hints -----------------------------------------------------------------
def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"{len(args)} values ({', '.join(_type_name(a) for a in args)})" if ... not in args else "a list"
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "unset (null)"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_type(name: str, value: Any, hint: Any) -> Any:
    """`value` as a setting of type `hint` (an int is a float, a list a tuple), or a one-line error naming
    the option. Every float must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    wrong = PixformerError(f"{option(name)} must be {_type_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return check_type(name, value, arg)
            except PixformerError as e:
                if arg is float and isinstance(value, float):    # a number, but not finite: say so
                    raise e
        raise wrong
    if origin is typing.Literal:
        if value not in args:
            raise PixformerError(f"{option(name)} must be one of {' | '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise wrong
        each = [args[0]] * len(value) if origin is list or (len(args) == 2 and args[1] is ...) else list(args)
        if origin is list and not args:
            each = [Any] * len(value)
        if len(each) != len(value):
            raise wrong
        items = [check_type(name, v, h) for v, h in zip(value, each)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise wrong
        return dict(value)
    if hint is type(None):
        if value is not None:
            raise wrong
        return None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if not math.isfinite(value):
            raise PixformerError(f"{option(name)} must be a finite number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise PixformerError(f"{option(name)} must be a mapping of settings, e.g. {{{_first_field(hint)}: ...}}, "
                                 f"got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise wrong
    return value


def _first_field(cls: type) -> str:
    return dataclasses.fields(cls)[0].name


def square(size: Any) -> Any:
    """An image size given as one int as (size, size); anything else as it is, for check_fields to judge."""
    return (size, size) if isinstance(size, int) and not isinstance(size, bool) else size


def check_fields(obj: Any) -> None:
    """Every field of the dataclass instance `obj` against its type hint (converted in place: a list
    given for a tuple field becomes a tuple, an int for a float field a float)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check_type(f.name, getattr(obj, f.name), hints[f.name]))

"""The config engine: frozen dataclass schemas <- defaults, YAML files and dotted overrides.

Schema-free: every function takes the root dataclass of a schema (the trainer's sections in
:mod:`gti_jax.train.config`, the recommendation front end's in :mod:`gti_jax.rec.config`,
the whole run's in :mod:`gti_jax.pipeline`). Not to be confused with
:mod:`gti_jax.models.config`, the model architecture's ``config.json``.

A config is built in three layers, each overriding the one before:

1. the dataclass defaults;
2. a YAML file (``--config FILE``) holding a nested mapping of the same keys;
3. dotted ``key=value`` overrides (or ``--key value``, ``--key=value``); the value is read
   with YAML rules, so ``sft.steps=100``, ``eval.k=[5,10]``, ``mesh.shape={data: 2}`` and
   ``data.pairs=null`` all work; a key that takes text but no number keeps the text as
   written (``run_dir=2024``).

:func:`parse_cli` is the command line of every gti_jax CLI (``gti-train``, ``gti-extend``,
``gti-prepare``, ``gti-diagnose``): ``--config`` takes a file or a shipped config's name
(``--config quickstart``), ``--print-config`` prints the resolved config as YAML and exits,
``--help`` lists the keys.

Each field carries its documentation as a string literal right under it (levanter style);
:func:`help_text` reads those strings back from the source. Mapping-valued keys merge key by
key over their defaults (``mesh.shape={data: 2}`` keeps the other axes); a single entry can
also be set as ``mesh.shape.data=2``. Every problem is one :class:`ConfigError` line that
names the key and the fix.

Example:
  >>> from gti_jax.rec.config import PrepareConfig
  >>> load(PrepareConfig, None, ["rec.levels=2", "data.max_len=64"]).data
  PrepareDataConfig(max_len=64)
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from gti_jax.errors import ConfigError
from gti_jax.io.atomic import atomic_write

__all__ = [
    "ConfigError",
    "at_least",
    "check",
    "config_dirs",
    "find_config",
    "help_text",
    "key_type",
    "load",
    "parse_cli",
    "positive",
    "save",
    "split_argv",
    "to_dict",
    "walk_keys",
]

Check = Callable[[Any], None]


# --------------------------------------------------------------------------------------------
# Value checks used by the schemas' validators (one line each).
# --------------------------------------------------------------------------------------------


def check(cond: bool, message: str) -> None:
    """Raises ``ConfigError(message)`` unless `cond`."""
    if not cond:
        raise ConfigError(message)


def at_least(key: str, value: int | float | None, low: float) -> None:
    """`value` (when not None) must be >= `low`."""
    if value is not None:
        check(value >= low, f"{key} must be >= {low}, got {value}")


def positive(key: str, value: float | None) -> None:
    """`value` (when not None) must be > 0."""
    if value is not None:
        check(value > 0, f"{key} must be > 0, got {value}")


# --------------------------------------------------------------------------------------------
# Schema introspection.
# --------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Reads the string literal written under each field of a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen app): help without docs
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_mapping_type(tp: Any) -> bool:
    return typing.get_origin(tp) is dict


def walk_keys(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """All leaf keys of schema `cls` as ``(dotted key, type, default, doc)``, in order."""
    out = []
    defaults = cls()
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = prefix + f.name
        if _is_section(tp):
            out.extend(walk_keys(tp, key + "."))
        else:
            out.append((key, tp, getattr(defaults, f.name), docs.get(f.name, "")))
    return out


@functools.cache
def _all_keys(cls: type) -> tuple[str, ...]:
    return tuple(k for k, *_ in walk_keys(cls))


def _type_name(tp: Any) -> str:
    """A short YAML-flavoured name of a type: int, float, list[int], str | null, ..."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "|".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    return str(tp)


_PHRASES = {
    int: "an int",
    float: "a number",
    bool: "a bool (true or false)",
    str: "a string",
    type(None): "null",
}


def _describe(tp: Any) -> str:
    """The phrase used in 'X must be ...' messages."""
    if tp in _PHRASES:
        return _PHRASES[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if typing.get_origin(args[0]) is Literal:
            return "a list of " + ", ".join(repr(a) for a in typing.get_args(args[0]))
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if _is_section(tp):
        return "a mapping (a config section)"
    return _type_name(tp)


def _closest(root: type, key: str) -> str:
    keys = _all_keys(root)
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:  # a typo in the section part: compare the last component only
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        hits = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[hits[0]]] if hits else []
    if match:
        return f"; did you mean '{match[0]}'?"
    return "; run with --help to list the valid keys"


def _unknown(root: type, key: str) -> ConfigError:
    return ConfigError(f"unknown config key '{key}'{_closest(root, key)}")


# --------------------------------------------------------------------------------------------
# Merging raw values (YAML mappings and overrides) into the defaults.
# --------------------------------------------------------------------------------------------


def _merge(
    root: type, cls: type, raw: dict, update: Any, prefix: str, ignore_unknown: bool = False
) -> None:
    """Merges a nested mapping `update` into the raw dict of section `cls`, checking keys."""
    if not isinstance(update, Mapping):
        where = prefix.rstrip(".")
        raise ConfigError(
            f"{where} must be a mapping (a config section), got {update!r}; "
            f"set its keys, e.g. {where}.{dataclasses.fields(cls)[0].name}=..."
        )
    hints = _hints(cls)
    for name, value in update.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            if ignore_unknown:
                continue
            raise _unknown(root, key)
        tp = hints[name]
        if _is_section(tp):
            _merge(root, tp, raw[name], value, key + ".", ignore_unknown)
        elif _is_mapping_type(tp) and isinstance(value, Mapping):
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value


def _set_dotted(root: type, raw: dict[str, Any], key: str, value: Any) -> None:
    """Applies one dotted override `key` = `value` to the raw tree of schema `root`."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed config key '{key}'; write dotted names like sft.steps")
    cls: type = root
    node = raw
    for i, name in enumerate(parts):
        hints = _hints(cls)
        if name not in hints:
            raise _unknown(root, key)
        tp = hints[name]
        rest = parts[i + 1 :]
        if not rest:
            _merge(root, cls, node, {name: value}, ".".join(parts[:i]) + "." if i else "")
            return
        if _is_section(tp):
            cls, node = tp, node[name]
            continue
        if _is_mapping_type(tp) and len(rest) == 1:  # mesh.shape.data=2
            node[name] = {**node[name], rest[0]: value}
            return
        raise _unknown(root, key)


# --------------------------------------------------------------------------------------------
# Typed construction.
# --------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    pass


def _coerce_scalar(value: Any, tp: Any) -> Any:
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    # float
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; returns it in the dataclass's form."""
    if tp is Any:
        return value
    if tp in (type(None), bool, int, float, str):
        return _coerce_scalar(value, tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Mismatch
            try:
                out[k] = _coerce(v, args[1], key)
            except _Mismatch:
                raise ConfigError(f"{key}.{k} must be {_describe(args[1])}, got {v!r}") from None
        return out
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    kwargs = {}
    for name, tp in _hints(cls).items():
        key = prefix + name
        value = raw[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        try:
            kwargs[name] = _coerce(value, tp, key)
        except _Mismatch:
            raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}") from None
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """Turns a config (or one of its sections) into plain YAML-ready values.

    Tuples become lists and sections nested dicts, so the result round-trips through
    :func:`load`.

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass(frozen=True)
      ... class C:
      ...     k: tuple[int, ...] = (1, 2)
      >>> to_dict(C())
      {'k': [1, 2]}
    """

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _parse_override(item: str) -> tuple[str, Any, str]:
    """``key=value`` -> ``(key, value read as YAML, the value's text)``."""
    if "=" not in item:
        raise ConfigError(
            f"malformed override '{item}': no '='; write key=value, e.g. sft.steps=100"
        )
    key, text = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if not key:
        raise ConfigError(f"malformed override '{item}': empty key; write key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        reason = " ".join(str(getattr(e, "problem", "") or e).split())
        raise ConfigError(f"cannot parse the value of override '{item}': {reason}") from None
    return key, value, text


def key_type(root: type, key: str) -> Any | None:
    """The annotation of the dotted `key` of schema `root`, or None if it names no key.

    An entry of a mapping-valued key (``mesh.shape.data``) has the mapping's value type.

    Example:
      >>> from gti_jax.rec.config import PrepareConfig
      >>> key_type(PrepareConfig, "data.max_len"), key_type(PrepareConfig, "data.nope")
      (<class 'int'>, None)
    """
    cls: type = root
    parts = key.split(".")
    for i, name in enumerate(parts):
        tp = _hints(cls).get(name)
        rest = parts[i + 1 :]
        if tp is None or not rest:
            return tp
        if _is_section(tp):
            cls = tp
        elif _is_mapping_type(tp) and len(rest) == 1:
            return typing.get_args(tp)[1]
        else:
            return None
    return None


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _wants_text(tp: Any) -> bool:
    """A key that takes a string but no number: ``run_dir=2024`` and ``new_ids=10:20`` (which
    YAML 1.1 reads as the sexagesimal 620) mean the text as written."""
    members = _members(tp)
    return str in members and int not in members and float not in members


def _read_yaml(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        reason = " ".join(str(getattr(e, "problem", "") or e).split())
        raise ConfigError(f"config file {path} is not valid YAML{where}: {reason}") from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys (e.g. 'sft: {{steps: 10}}'), "
            f"got {type(doc).__name__}"
        )
    return doc


def load(
    schema: type,
    path: str | None,
    overrides: Sequence[str] = (),
    *,
    validate: Check | None = None,
    file_may_hold_more: bool = False,
) -> Any:
    """Builds a checked config of `schema` from its defaults, a YAML file and overrides.

    Args:
      schema: the root dataclass.
      path: a YAML file holding a nested mapping of config keys, or None for the defaults.
      overrides: dotted ``key=value`` strings applied in order after the file; values are
        read with ``yaml.safe_load`` (``eval.k=[5,10]``, ``data.pairs=null``).
      validate: ``validate(cfg)`` raises ConfigError for out-of-range values.
      file_may_hold_more: keys of the file that `schema` lacks are ignored (a tool reading
        its part of a larger config file); overrides are always checked.

    Raises:
      ConfigError: one line naming the bad key or value and the fix.
    """
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of 'key=value' strings, not one string")
    parsed = [_parse_override(item) for item in overrides]  # syntax first, before any I/O
    raw = to_dict(schema())
    if path is not None:
        _merge(schema, schema, raw, _read_yaml(find_config(path)), "", file_may_hold_more)
    for key, value, text in parsed:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if _wants_text(key_type(schema, key)):
                value = text.strip()
        _set_dotted(schema, raw, key, value)
    cfg = _build(schema, raw)
    if validate is not None:
        validate(cfg)
    return cfg


def save(cfg: Any, path: str | os.PathLike) -> None:
    """Writes `cfg` as YAML, atomically (a temporary file renamed into place)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    atomic_write(os.path.abspath(path), lambda f: f.write(text))


def help_text(schema: type, header: Sequence[str]) -> str:
    """`header`, then every key of `schema` with its type, default and documentation."""
    lines = list(header)
    section = None
    section_docs = _field_docs(schema)
    for key, tp, default, doc in walk_keys(schema):
        head = key.split(".", 1)[0] if "." in key else ""
        if head != section:
            section = head
            title = f"{head}: {section_docs.get(head, '')}" if head else "top level:"
            lines += ["", title]
        shown = yaml.safe_dump(
            to_dict(default), default_flow_style=True, sort_keys=False, width=10**6
        )
        shown = shown.strip().removesuffix("...").strip()
        lines.append(f"  {key} ({_type_name(tp)}, default {shown})")
        if doc:
            lines += textwrap.wrap(doc, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Config files by name and the command line (every CLI of gti_jax parses here).
# --------------------------------------------------------------------------------------------


def config_dirs() -> list[Path]:
    """Where ``--config NAME`` looks: the configs shipped in the package (an installed wheel
    holds ``gti_jax/configs/``), then the ``configs/`` directory of a source checkout."""
    package = Path(__file__).resolve().parent
    return [package / "configs", package.parent / "configs"]


def find_config(name: str) -> str:
    """The file `name` means: an existing path as it is, else a shipped config by name
    (``quickstart`` or ``quickstart.yaml`` -> ``configs/quickstart.yaml``).

    Raises:
      ConfigError: neither exists (the message lists the shipped names).

    Example:
      >>> Path(find_config("quickstart")).name
      'quickstart.yaml'
    """
    if os.path.isfile(name):
        return name
    if os.sep not in name and "/" not in name:
        file = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
        for d in config_dirs():
            if (d / file).is_file():
                return str(d / file)
    shipped = sorted({p.stem for d in config_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(
        f"config file not found: {name}; give a YAML file or a shipped config's name "
        f"({', '.join(shipped) or 'none installed'})"
    )


def _is_flag(tp: Any) -> bool:
    return tp is not None and bool in _members(tp)


def _reads_as_bool(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), bool)
    except yaml.YAMLError:
        return False


def _option_key(schema: type, name: str, aliases: Mapping[str, str]) -> str:
    """The dotted key an option ``--name`` sets: an alias, the name, or its dashes read as
    underscores (``--pad-to-multiple-of`` -> ``pad_to_multiple_of``)."""
    if name in aliases:
        return aliases[name]
    if key_type(schema, name) is None and key_type(schema, name.replace("-", "_")) is not None:
        return name.replace("-", "_")
    return name


def _option(schema: type, args: list[str], i: int, aliases: Mapping[str, str]) -> tuple[str, int]:
    """``--key value``, ``--key=value`` or a bare ``--flag`` at ``args[i]`` -> ``key=value``
    and the index after it."""
    name, has_value, text = args[i][2:].partition("=")
    key = _option_key(schema, name, aliases)
    tp = key_type(schema, key)
    if tp is None:
        raise ConfigError(
            f"unknown option '--{name}' (no config key '{key}'{_closest(schema, key)})"
        )
    nxt = args[i + 1] if i + 1 < len(args) else None
    step = 1
    if not has_value:
        value_next = nxt is not None and not nxt.startswith("--")
        if _is_flag(tp) and not (value_next and _reads_as_bool(nxt)):
            return f"{key}=true", i + 1  # --skip-existing
        if not value_next:
            raise ConfigError(f"option '--{name}' needs a value: --{name} VALUE or {key}=VALUE")
        text, step = nxt, 2
    if _is_mapping_type(tp) and not text.lstrip().startswith("{"):
        entry, sep, value = text.partition("=")
        if not sep or not entry:
            raise ConfigError(
                f"--{name} {text!r}: expected NAME=VALUE (one entry, repeatable) or a "
                f"mapping {{NAME: VALUE}}"
            )
        return f"{key}.{entry}={value}", i + step
    return f"{key}={text}", i + step


def split_argv(
    argv: Sequence[str],
    schema: type,
    *,
    positional: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> tuple[str | None, list[str]]:
    """``[--config FILE] [ARG ...] [key=value | --key value | --key=value | --flag ...]`` ->
    ``(FILE or None, key=value overrides)``.

    Args:
      argv: the arguments after the program's name.
      schema: the root dataclass (option names are checked against its keys).
      positional: keys that bare arguments (no ``=``, no leading ``-``) set, in order.
      aliases: option names (without ``--``) -> the keys they set, for spellings a CLI keeps.

    Raises:
      ConfigError: a malformed option, an unknown key, a missing value (one line).

    Example:
      >>> from gti_jax.rec.config import PrepareConfig
      >>> split_argv(["--rec.levels", "2", "--data.max_len=64", "seed=3"], PrepareConfig)
      (None, ['rec.levels=2', 'data.max_len=64', 'seed=3'])
    """
    args = list(argv)
    aliases = dict(aliases or {})
    bare = list(positional)
    path = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else None
            if value is None and i + 1 < len(args):
                value = args[i + 1]
            i += 1 if "=" in arg else 2
            if not value:
                raise ConfigError("--config needs a file: --config configs/quickstart.yaml")
            if path is not None:
                raise ConfigError("--config given twice; pass one file and key=value overrides")
            path = value
        elif arg.startswith("--") and len(arg) > 2:
            item, i = _option(schema, args, i, aliases)
            overrides.append(item)
        elif arg.startswith("-") and "=" not in arg:
            raise ConfigError(
                f"unknown option '{arg}'; use --config FILE, --help, --print-config, "
                "--key value or key=value"
            )
        else:
            if "=" not in arg and bare and not arg.startswith("-"):
                arg = f"{bare.pop(0)}={arg}"
            overrides.append(arg)
            i += 1
    return path, overrides


def parse_cli(
    schema: type,
    argv: Sequence[str],
    *,
    help: Callable[[], str],
    validate: Check | None = None,
    positional: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
    file_may_hold_more: bool = False,
) -> Any:
    """Parses a command line into a config of `schema`: the one argument style of every
    gti_jax CLI.

    ``[--config FILE|NAME] [--help] [--print-config] [key=value | --key value | --key=value
    ...]``: ``--config`` takes a YAML file or the name of a shipped config (``quickstart``);
    a bool key given as a bare ``--flag`` is true; a mapping key takes ``--key NAME=VALUE``
    entries; `positional`, `aliases` and `file_may_hold_more` as in :func:`split_argv` and
    :func:`load`.

    Raises:
      SystemExit: with code 0 after printing ``help()`` for ``-h``/``--help``, or the
        resolved and checked config as YAML for ``--print-config``.
      ConfigError: a bad option, key or value (one line).

    Example:
      >>> from gti_jax.rec.config import PrepareConfig
      >>> parse_cli(PrepareConfig, ["--seed", "3"], help=str).seed
      3
    """
    args = list(argv)
    if "-h" in args or "--help" in args:
        sys.stdout.write(help())
        raise SystemExit(0)
    show = "--print-config" in args
    args = [a for a in args if a != "--print-config"]
    path, overrides = split_argv(args, schema, positional=positional, aliases=aliases)
    cfg = load(schema, path, overrides, validate=validate, file_may_hold_more=file_may_hold_more)
    if show:
        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))
        raise SystemExit(0)
    return cfg

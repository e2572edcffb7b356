"""Command-line options generated from option dataclasses (ModelConfig, TrainConfig, ...).

Every dataclass field becomes ``--<prefix><name>``: bools as ``--flag/--no-flag``, lists with
``nargs``, Optional types accept ``none``. Adding a family of options (e.g. a ParallelConfig) is one
more ``OptionGroup`` in the list the CLI passes here. Values are merged in this order:
dataclass defaults < preset or ``--config FILE`` (YAML, flat names) < command line. Which options
the user gave explicitly is kept, so ``--init_from resume`` can override only those.

Parsing errors raise ConfigError (one line, with a "did you mean" suggestion) instead of argparse's
usage dump, because the CLI prints user errors as a single line and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import os
import shutil
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from forge_dist.errors import ConfigError

NONE_WORDS = ("none", "None", "null")


@dataclass(frozen=True)
class OptionGroup:
    title: str
    cls: type  # a dataclass
    prefix: str = ""  # "" -> --name; "parallel." -> --parallel.name
    help: Mapping[str, str] = field(default_factory=dict)
    choices: Mapping[str, Sequence] = field(default_factory=dict)
    # False for options that describe how this launch runs (parallel sizes, the engine), not the
    # run itself: --init_from resume never takes them from the checkpoint, the command line decides
    resumable: bool = True

    def keys(self) -> List[str]:
        return [self.prefix + f.name for f in dataclasses.fields(self.cls)]

    def hints(self) -> dict:
        return _type_hints(self.cls)


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


@dataclass
class ParsedOptions:
    values: Dict[str, Any]  # every key of every group, merged
    explicit: Dict[str, Any]  # only what the command line or a --config file set
    config_file: Optional[str]

    def group_kwargs(self, group: OptionGroup, values: Optional[Mapping] = None) -> dict:
        src = self.values if values is None else values
        return {k[len(group.prefix):]: src[k] for k in group.keys() if k in src}


# --- types ----------------------------------------------------------------------------------------
def _unwrap_optional(tp) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar_parser(tp, optional: bool) -> Callable[[str], Any]:
    def parse(text: str):
        if optional and text in NONE_WORDS:
            return None
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return tp(text)

    parse.__name__ = getattr(tp, "__name__", str(tp))  # argparse names it in "invalid int value"
    return parse


def coerce(key: str, value, tp):
    """A value from a YAML file -> the field's type (YAML reads 1e-3 as a string)."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and value in NONE_WORDS):
        return None
    if typing.get_origin(inner) in (list, List):
        (item,) = typing.get_args(inner) or (str,)
        items = value if isinstance(value, list) else [value]
        return [coerce(key, v, item) for v in items]
    try:
        if isinstance(value, str) and inner is not str:
            return _scalar_parser(inner, optional)(value)
        if inner is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(inner, '__name__', inner)}") from None
    return value


def _format_default(value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value is None:
        return "none"
    if isinstance(value, list):
        return "[" + " ".join(str(v) for v in value) + "]" if value else "[]"
    return repr(value) if isinstance(value, str) else str(value)


# --- parser ---------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one-line ConfigErrors (the CLIs print them and exit 2)."""

    def error(self, message):  # one line, no usage dump
        raise ConfigError(f"{message} (see {self.prog} --help)")


def runnable(prog: str) -> str:
    """How to type ``prog`` here: its name when the shell finds this installation's copy, else
    its path next to this Python (``.venv/bin/forge-sample`` when the venv is not activated), so
    the commands we print run as typed."""
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), prog)
    if not os.path.isfile(beside):
        return prog
    found = shutil.which(prog)
    if found and os.path.realpath(found) == os.path.realpath(beside):
        return prog
    rel = os.path.relpath(beside)
    return rel if not rel.startswith(os.pardir) else beside


def fail(message: str, prog: str, quiet: bool = False) -> None:
    """Exit 2 with one line (user errors never show a traceback); ``quiet``: exit without it (the
    other ranks of a launch, whose rank 0 says the same)."""
    if not quiet:
        print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def _add_field(parser, group: OptionGroup, f: dataclasses.Field, default) -> None:
    key = group.prefix + f.name
    tp, optional = _unwrap_optional(group.hints()[f.name])
    text = group.help.get(f.name, "")
    choices = group.choices.get(f.name)
    if choices:
        names = ", ".join("none" if c is None else str(c) for c in choices)
        text += (" " if text else "") + f"one of: {names}."
    text = (text + " " if text else "") + f"(default: {_format_default(default)})"
    kwargs = dict(dest=key, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
    if tp is bool:
        parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(tp) in (list, List):
        (item,) = typing.get_args(tp) or (str,)
        parser.add_argument(f"--{key}", nargs="*", type=_scalar_parser(*_unwrap_optional(item)), metavar=key.upper(),
                            **kwargs)
    else:
        parser.add_argument(f"--{key}", type=_scalar_parser(tp, optional), metavar=key.upper(), **kwargs)


def build_parser(prog: str, groups: Sequence[OptionGroup], defaults: Mapping[str, Any],
                 description: str = "") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, usage=f"{prog} [--config FILE] [--OPTION VALUE ...]",
                           description=description, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML file of options (flat names, as on the command line); replaces the "
                             "embedded default preset; command-line values override it")
    seen = {"config"}
    for group in groups:
        arg_group = parser.add_argument_group(f"{group.title} options")
        for f in dataclasses.fields(group.cls):
            key = group.prefix + f.name
            if key in seen:
                raise KeyError(f"option --{key} is declared by two option groups")
            seen.add(key)
            _add_field(arg_group, group, f, defaults[key])
    return parser


def dataclass_defaults(groups: Sequence[OptionGroup]) -> Dict[str, Any]:
    out = {}
    for group in groups:
        for f in dataclasses.fields(group.cls):
            if f.default is not dataclasses.MISSING:
                out[group.prefix + f.name] = f.default
            else:
                out[group.prefix + f.name] = f.default_factory()
    return out


def suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean --{close[0]}?" if close else ""


def load_yaml_options(path_or_text, groups: Sequence[OptionGroup], source: str) -> Dict[str, Any]:
    """A flat YAML mapping of option names -> values, typed like the command line."""
    try:
        data = yaml.safe_load(path_or_text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of option names to values")
    hints = {g.prefix + name: tp for g in groups for name, tp in g.hints().items()}
    out = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown option {key!r}{suggest(str(key), list(hints))}")
        out[key] = coerce(f"{source}: {key}", value, hints[key])
    return out


def read_config_file(path: str, groups: Sequence[OptionGroup]) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror}); give an existing YAML file") from None
    return load_yaml_options(text, groups, source=path)


def parse_options(argv: Sequence[str], prog: str, groups: Sequence[OptionGroup], preset_text: str,
                  description: str = "") -> ParsedOptions:
    """argv -> merged values; the preset applies when no --config FILE is given."""
    pre = OneLineParser(prog=prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        file_values = read_config_file(known.config, groups)
    else:
        file_values = load_yaml_options(preset_text, groups, source="embedded preset")
    defaults = {**dataclass_defaults(groups), **file_values}
    parser = build_parser(prog, groups, defaults, description)
    keys = [k for g in groups for k in g.keys()]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        first = next((u for u in unknown if u.startswith("--")), unknown[0])
        name = first[2:].split("=")[0]
        hint = suggest(name, keys) if first.startswith("--") else ""
        raise ConfigError(f"unknown option {first}{hint} (see {prog} --help)")
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    explicit = {**(file_values if known.config else {}), **cli}
    return ParsedOptions(values={**defaults, **cli}, explicit=explicit, config_file=known.config)


def dump_options(values: Mapping[str, Any]) -> str:
    """YAML that --config reads back to the same values."""
    clean = {k: (_format_default(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in values.items()}
    return yaml.safe_dump(clean, sort_keys=False, allow_unicode=True)

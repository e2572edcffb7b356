"""Regenerate the model-option tables of README.md from ModelConfig and the variant registries.

One table per family (the ``# --- family ---`` sections of forge_dist/config/model_config.py):
option, default, valid values. Run after adding an option or a variant:

    python tools/gen_option_tables.py          # rewrites the block between the README markers
    python tools/gen_option_tables.py --check  # exits 1 if README is stale (the test suite runs this)
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- option-tables:begin -->", "<!-- option-tables:end -->"
ROOT = Path(__file__).resolve().parents[1]


def _families():
    """[(family title, [field names])] in source order, from the section comments."""
    from forge_dist.config import model_config

    families, current = [], None
    for line in inspect.getsource(model_config.ModelConfig).splitlines():
        m = re.match(r"\s+# --- (.+?) -+\s*$", line)
        if m:
            current = (m.group(1)[0].upper() + m.group(1)[1:], [])
            families.append(current)
            continue
        f = re.match(r"\s+(\w+): [^=]+=", line)
        if f and current is not None:
            current[1].append(f.group(1))
    return [(title, names) for title, names in families if names and not title.startswith("Derived")]


def _values(name: str, tp) -> str:
    from forge_dist.config.validate import CHOICES, REGISTRY_OPTIONS
    from forge_dist import variants as registries

    if name in REGISTRY_OPTIONS:
        return ", ".join(f"`{v}`" for v in getattr(registries, REGISTRY_OPTIONS[name]).names())
    if name in CHOICES:
        return ", ".join("`None`" if v is None else f"`{v}`" for v in CHOICES[name])
    return "true, false" if tp is bool else ""


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, float) and math.isinf(value):
        return "`inf`"
    return f"`{value}`"


def render() -> str:
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.config.validate import field_types

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    types = field_types(ModelConfig)
    out = [BEGIN, "", "Generated from `ModelConfig` and the variant registries by "
           "`tools/gen_option_tables.py`; the full descriptions are in `docs/options/`.", ""]
    for title, names in _families():
        out += [f"<details><summary><b>{title}</b> ({len(names)} options)</summary>", "",
                "| option | default | valid values |", "|---|---|---|"]
        for n in names:
            out.append(f"| `{n}` | {_default(fields[n])} | {_values(n, types[n])} |")
        out += ["", "</details>", ""]
    out.append(END)
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the markers {BEGIN} ... {END}", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + render() + tail
    if args.check:
        if new != text:
            print("README.md option tables are stale: run python tools/gen_option_tables.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

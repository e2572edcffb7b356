"""Every tokenizer kind by name: ``tokenizer_from_spec`` rebuilds any tokenizer from its ``spec()``
(tokenizer.py holds the kinds we run ourselves, spm.py the sentencepiece one)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from forge_dist.atomic import stays_inside
from forge_dist.data.errors import DataError
from forge_dist.data.hf_tokenizer import HuggingFaceTokenizer
from forge_dist.data.spm import SentencePieceTokenizer
from forge_dist.data.tokenizer import ByteTokenizer, CharTokenizer, ExternalTokenizer, TableTokenizer, Tokenizer

_KINDS = {"char": CharTokenizer, "byte": ByteTokenizer, "table": TableTokenizer, "external": ExternalTokenizer,
          "sentencepiece": SentencePieceTokenizer,  # spm.py imports sentencepiece only when used
          "huggingface": HuggingFaceTokenizer}  # imports tokenizers only when used


def tokenizer_from_spec(spec: dict, base_dir: Union[str, Path, None] = None) -> Tokenizer:
    """Rebuild a tokenizer from ``spec()`` (self-contained) or from ``save()``'s spec plus its folder."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _KINDS:
        raise DataError(f"unknown tokenizer kind {kind!r} in spec; known kinds: {', '.join(_KINDS)}")
    if "file" in spec:
        if base_dir is None:
            raise DataError(f"tokenizer spec refers to file {spec['file']!r}; pass the dataset folder")
        if not stays_inside(spec["file"]):
            raise DataError(f"the tokenizer spec in {base_dir} is refused: it names {spec['file']!r}, a path "
                            f"outside the dataset folder")
        path = Path(base_dir, spec["file"])
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read tokenizer file {path}: {exc}; prepare the dataset again") from exc
        if spec.get("kind") != kind:
            raise DataError(f"{path} holds a {spec.get('kind')!r} tokenizer, meta.json says {kind!r}")
    try:
        return _KINDS[kind].from_spec(spec, base_dir)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"malformed {kind} tokenizer spec ({type(exc).__name__}: {exc}); "
                        f"prepare the dataset again") from exc

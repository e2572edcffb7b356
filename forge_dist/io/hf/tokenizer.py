"""Our tokenizers as transformers tokenizers (``tokenizer.json`` for PreTrainedTokenizerFast), so
``AutoTokenizer.from_pretrained(dir)`` encodes and decodes exactly as forge_dist does.

  byte   GPT-2's byte-to-unicode alphabet: ByteLevel pre-tokenizer without its regex split, a BPE
         model whose 256 single-symbol pieces are the byte values (no merges), ByteLevel decoder
  char   a BPE model whose pieces are our characters in id order (no merges), no pre-tokenizer,
         a Fuse decoder (concatenation)
Other kinds (sentencepiece, table, external) are refused by name: the model is still exported
when the caller passes no tokenizer. Needs the ``tokenizers`` package (installed with transformers).
"""
from __future__ import annotations

import json
from typing import Dict, Tuple

from forge_dist.errors import ConfigError

SUPPORTED = ("byte", "char")


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table (Radford et al. 2019, encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _build(tok):
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError as e:
        raise ConfigError("exporting a tokenizer needs the tokenizers package: pip install transformers") from e
    if tok.kind == "byte":
        table = bytes_to_unicode()
        out = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
        out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        out.decoder = decoders.ByteLevel()
        return out
    out = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
    out.decoder = decoders.Fuse()
    return out


def tokenizer_files(tok) -> Tuple[Dict[str, str], dict]:
    """({file name: text}, special token ids for config.json) of a forge_dist tokenizer."""
    if tok.kind not in SUPPORTED:
        raise ConfigError(f"a {tok.kind!r} tokenizer has no exact transformers equivalent in this version "
                          f"(supported: {', '.join(SUPPORTED)}); export without it (no --dataset)")
    fast = _build(tok)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000, "forge_dist_tokenizer": tok.kind}
    return {"tokenizer.json": fast.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}, {}

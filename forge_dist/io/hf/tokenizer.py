"""Our tokenizers as transformers tokenizers (``tokenizer.json`` for PreTrainedTokenizerFast), so
``AutoTokenizer.from_pretrained(dir)`` encodes and decodes exactly as forge_dist does.

  byte   GPT-2's byte-to-unicode alphabet: ByteLevel pre-tokenizer without its regex split, a BPE
         model whose 256 single-symbol pieces are the byte values (no merges), ByteLevel decoder
  char   a BPE model whose pieces are our characters in id order (no merges), no pre-tokenizer,
         a Fuse decoder (concatenation)
  sentencepiece (with byte fallback, as forge-prepare trains it whenever the vocabulary has room)
         sentencepiece's own pipeline for our training settings (spm.py: no normalisation, no
         dummy prefix, whitespace and digit splits, "\n" a user-defined piece): a Metaspace
         pre-tokenizer without prefix, single digits, the unigram model with its scores or BPE
         with merges ordered by piece id, "<0xNN>" byte fallback, user-defined pieces as added
         tokens; the .model file goes along as tokenizer.model. Equal ids and text on the test
         corpus (tests/unit/test_hf_interop.py), not a proof for every sentencepiece option.
  huggingface  (a transformers tokenizer.json, forge-prepare --tokenizer_from) goes back as it came
Other kinds (table, external, sentencepiece without byte fallback) are refused by name: the model
is still exported when the caller passes no tokenizer. Needs ``tokenizers`` and ``protobuf``
(installed with transformers).
"""
from __future__ import annotations

import json
from typing import Dict, Tuple

from forge_dist.errors import ConfigError

SUPPORTED = ("byte", "char", "sentencepiece", "huggingface")


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
    if tok.kind == "sentencepiece":
        return _sentencepiece(tok)
    out = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
    out.decoder = decoders.Fuse()
    return out


def _sentencepiece(tok):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(tok.model_proto)
    spec = proto.trainer_spec
    if not spec.byte_fallback:
        raise ConfigError("this sentencepiece tokenizer has no byte fallback (its vocabulary was too small), "
                          "so unknown characters do not map exactly; export without it (no --dataset)")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == 1:  # unigram
        model = models.Unigram(pieces, unk_id=spec.unk_id, byte_fallback=True)
    else:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=spec.unk_piece, fuse_unk=True,
                           byte_fallback=True)
    out = Tokenizer(model)
    out.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True)])
    out.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    out.add_tokens([AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == 4])
    out.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces if p.type == 3])
    return out


def tokenizer_files(tok) -> Tuple[Dict[str, str], dict]:
    """({file name: text}, special token ids for config.json) of a forge_dist tokenizer."""
    if tok.kind not in SUPPORTED:
        raise ConfigError(f"a {tok.kind!r} tokenizer has no exact transformers equivalent in this version "
                          f"(supported: {', '.join(SUPPORTED)}); export without it (no --dataset)")
    if tok.kind == "huggingface":  # a transformers tokenizer (forge-prepare --tokenizer_from): back as it came
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": 1_000_000_000}
        return {"tokenizer.json": tok.tokenizer_json,
                "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}, {}
    fast = _build(tok)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000, "forge_dist_tokenizer": tok.kind}
    out = {"tokenizer.json": fast.to_str(pretty=True),
           "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
    if tok.kind == "sentencepiece":
        out["tokenizer.model"] = tok.model_proto  # the standard binary, for tools that want it
    return out, {}


def read_tokenizer(path: str):
    """The tokenizer of a transformers directory: ours again where ``tokenizer_files`` wrote it
    (tokenizer_config.json names its kind), else its tokenizer.json run by the tokenizers library
    (forge_dist.data.hf_tokenizer); None without either."""
    import os

    from forge_dist.data.hf_tokenizer import HuggingFaceTokenizer
    from forge_dist.data.tokenizer import ByteTokenizer, CharTokenizer

    try:
        kind = None
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            with open(os.path.join(path, "tokenizer_config.json"), "r", encoding="utf-8") as f:
                kind = json.load(f).get("forge_dist_tokenizer")
        if kind is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HuggingFaceTokenizer.load(path)
        if kind == "byte":
            return ByteTokenizer()
        if kind == "char":
            with open(os.path.join(path, "tokenizer.json"), "r", encoding="utf-8") as f:
                vocab = json.load(f)["model"]["vocab"]
            return CharTokenizer(sorted(vocab, key=vocab.get))
        if kind == "sentencepiece":
            from forge_dist.data.spm import SentencePieceTokenizer

            return SentencePieceTokenizer.load(os.path.join(path, "tokenizer.model"))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        # the weights convert without it; say so rather than drop a tokenizer the user expects
        import warnings

        warnings.warn(f"{path}: its tokenizer files could not be read ({type(e).__name__}: {e}); "
                      f"continuing without a tokenizer", stacklevel=2)
        return None
    return None

"""forge-prepare: text files -> tokenizer -> Arrow token shards, or import a ReaLLM-Forge folder.

    forge-prepare --input a.txt b.txt --out_dir data/mine --tokenizer char
    forge-prepare --input a.txt --out_dir data/mine --tokenizer sentencepiece --vocab_size 2000
    forge-prepare --from_reallm_forge path/to/data/shakespeare_char --out_dir data/shakespeare_char

The inputs are concatenated in the order given, encoded, and split by tokens: the first
(1 - val_fraction) go to train, the rest to val (upstream splits the text the same way, by
--percentage_train). ``prepare_default_dataset`` does this for the bundled corpus on first use.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from forge_dist.data.fables import DEFAULT_DATASET
from forge_dist.data.errors import DataError
from forge_dist.data.shards import META_FILE, DatasetMeta, write_dataset
from forge_dist.data.tokenizer import ByteTokenizer, CharTokenizer, Tokenizer

TOKENIZERS = ("char", "byte", "sentencepiece")
DEFAULT_SP_VOCAB = 500  # upstream prepare.py's default --vocab_size
CORPUS = Path(__file__).with_name("corpus") / "fables.txt"


def read_inputs(paths: Sequence[Union[str, Path]], as_bytes: bool = False) -> Union[str, bytes]:
    """The inputs concatenated; text must be UTF-8 (the byte tokenizer takes any bytes)."""
    if not paths:
        raise DataError("no --input files given")
    chunks = []
    for path in map(Path, paths):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read --input {path}: {exc}") from exc
        if not as_bytes:
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"--input {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                                f"convert it to UTF-8 or use --tokenizer byte") from exc
        chunks.append(data)
    return (b"" if as_bytes else "").join(chunks)


def build_tokenizer(kind: str, text: str, vocab_size: Optional[int] = None, sp_model_type: str = "bpe",
                    sp_model: Optional[Union[str, Path]] = None, num_threads: int = 1) -> Tokenizer:
    """The tokenizer ``kind`` for ``text``: a char vocabulary, bytes, or a trained/loaded sentencepiece."""
    if kind not in TOKENIZERS:
        raise DataError(f"--tokenizer={kind!r}; valid values: {', '.join(TOKENIZERS)}")
    if kind != "sentencepiece" and (vocab_size is not None or sp_model is not None):
        raise DataError(f"--vocab_size and --sp_model apply only to --tokenizer sentencepiece, not {kind}")
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "byte":
        return ByteTokenizer()
    from forge_dist.data.spm import SentencePieceTokenizer

    if sp_model is not None:
        if vocab_size is not None:
            raise DataError("--sp_model loads a trained model; --vocab_size applies only when training one")
        return SentencePieceTokenizer.load(sp_model)
    return SentencePieceTokenizer.train(text, vocab_size or DEFAULT_SP_VOCAB, sp_model_type, num_threads)


def prepare_text(inputs: Sequence[Union[str, Path]], out_dir: Union[str, Path], tokenizer: Union[str, Tokenizer] = "char",
                 vocab_size: Optional[int] = None, sp_model_type: str = "bpe",
                 sp_model: Optional[Union[str, Path]] = None, val_fraction: float = 0.1,
                 overwrite: bool = False, num_threads: int = 1) -> DatasetMeta:
    """Tokenize ``inputs`` and write the dataset folder ``out_dir``; returns its meta. ``tokenizer``
    names a kind to build, or is a ready Tokenizer (--tokenizer_from)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val_fraction {val_fraction} must be in [0, 1)")
    text = read_inputs(inputs, as_bytes=tokenizer == "byte")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else \
        build_tokenizer(tokenizer, text, vocab_size, sp_model_type, sp_model, num_threads)
    ids = tok.encode_array(text)
    if len(ids) < 2:
        raise DataError(f"the inputs encode to {len(ids)} tokens; a language model needs more text")
    n_train = len(ids) - int(len(ids) * val_fraction)
    splits = {"train": ids[:n_train]}
    if val_fraction > 0:
        splits["val"] = ids[n_train:]
    source = {"kind": "text", "files": [Path(p).name for p in inputs], "tokenizer": tok.kind,
              "val_fraction": val_fraction}
    return write_dataset(out_dir, tok, splits, source=source, overwrite=overwrite)


def default_cache_dir() -> Path:
    """$FORGE_DIST_CACHE, else $XDG_CACHE_HOME/forge_dist, else ~/.cache/forge_dist."""
    if os.environ.get("FORGE_DIST_CACHE"):
        return Path(os.environ["FORGE_DIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forge_dist"


def prepare_default_dataset(cache_dir: Union[str, Path, None] = None) -> Path:
    """The bundled corpus as a char-level dataset folder, prepared once and then reused.

    The folder name carries a hash of the corpus, so a changed corpus is prepared afresh. Writing
    is atomic, so ranks that race here all end up with the one complete folder.
    """
    key = hashlib.sha256(CORPUS.read_bytes()).hexdigest()[:12]
    folder = Path(cache_dir or default_cache_dir() / "datasets") / f"{DEFAULT_DATASET}-{key}"
    if not (folder / META_FILE).exists():
        try:
            prepare_text([CORPUS], folder, tokenizer="char", val_fraction=0.1)
        except DataError:
            if not (folder / META_FILE).exists():  # not a lost race: a real failure
                raise
    DatasetMeta.load(folder)
    return folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge-prepare", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE", help="UTF-8 text files, concatenated in order")
    src.add_argument("--from_reallm_forge", metavar="DIR",
                     help="a ReaLLM-Forge dataset folder (train.bin, val.bin, meta.pkl) to import")
    p.add_argument("--out_dir", required=True, metavar="DIR", help="dataset folder to create")
    p.add_argument("--tokenizer", choices=TOKENIZERS, help="default: char")
    p.add_argument("--vocab_size", type=int, default=None, metavar="N",
                   help=f"sentencepiece vocabulary to train (default: {DEFAULT_SP_VOCAB})")
    p.add_argument("--sp_model_type", choices=("bpe", "unigram"), help="sentencepiece model to train (default: bpe)")
    p.add_argument("--sp_model", default=None, metavar="PATH",
                   help="an existing sentencepiece .model to use instead of training one (also for imports)")
    p.add_argument("--tokenizer_from", default=None, metavar="DIR",
                   help="use the tokenizer.json of this transformers directory (a model to fine-tune)")
    p.add_argument("--val_fraction", type=float, metavar="F",
                   help="share of tokens held out for validation, 0 for none (default: 0.1)")
    p.add_argument("--bin_dtype", choices=("uint16", "uint32"), default=None,
                   help="dtype of imported .bin files (default: uint32 if vocab_size > 65535, else uint16)")
    p.add_argument("--num_threads", type=int, metavar="N",
                   help="sentencepiece training threads (default: min(4, CPU cores))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out_dir")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.from_reallm_forge:
            from forge_dist.data.meta_import import import_reallm_forge

            _refuse(args, ("tokenizer", "vocab_size", "sp_model_type", "val_fraction", "num_threads", "tokenizer_from"),
                    "--input (an import keeps the folder's tokenizer and splits)")
            meta = import_reallm_forge(args.from_reallm_forge, args.out_dir, args.bin_dtype, args.sp_model,
                                       args.overwrite)
        else:
            _refuse(args, ("bin_dtype",), "--from_reallm_forge")
            tokenizer = args.tokenizer or "char"
            if args.tokenizer_from is not None:
                from forge_dist.data.hf_tokenizer import HuggingFaceTokenizer

                _refuse(args, ("tokenizer", "vocab_size", "sp_model_type", "sp_model"), "a tokenizer of your own, not with --tokenizer_from")
                tokenizer = HuggingFaceTokenizer.load(args.tokenizer_from)
            meta = prepare_text(args.input, args.out_dir, tokenizer, args.vocab_size,
                                args.sp_model_type or "bpe", args.sp_model,
                                0.1 if args.val_fraction is None else args.val_fraction, args.overwrite,
                                args.num_threads or min(4, os.cpu_count() or 1))
    except DataError as exc:
        print(f"forge-prepare: error: {exc}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{name} {n:,} tokens" for name, n in meta.split_tokens().items())
    print(f"wrote {args.out_dir}: {sizes}; vocab {meta.vocab_size} ({meta.dtype}), "
          f"tokenizer {meta.tokenizer['kind']}")
    _warn_lossy(args.out_dir, meta)
    return 0


def _refuse(args, options, where: str) -> None:
    given = [f"--{name}" for name in options if getattr(args, name) is not None]
    if given:
        raise DataError(f"{', '.join(given)} applies only with {where}")


def _warn_lossy(out_dir, meta: DatasetMeta) -> None:
    """Say when text outside the training data would be lost (sentencepiece without byte fallback)."""
    if meta.tokenizer["kind"] == "sentencepiece":
        from forge_dist.data.tokenizers import tokenizer_from_spec

        if not tokenizer_from_spec(meta.tokenizer, out_dir).byte_fallback:
            print("note: the vocabulary is too small for byte fallback, so characters not seen in the "
                  "input encode as <unk>; a larger --vocab_size avoids that", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""ReaLLM-Forge dataset folders (train.bin, val.bin, meta.pkl), read without trusting the pickle.

meta.pkl is a pickle, and unpickling runs whatever code the file names. Upstream only ever
stores plain values in it (vocab_size, tokenizer name, stoi/itos tables), so ``load_meta_pkl``
admits exactly those: dict, list, tuple, str, int, float, bool, None and bytes. Any reference to a
class or function (every code-running pickle needs one) is refused before it is resolved.

The .bin files are flat token ids. Upstream's prepare.py writes uint32 when vocab_size > 65535
and uint16 otherwise; its train.py reads uint32 only for vocab_size == 100277 (cl100k), which
mis-reads other large vocabularies. We follow the writer, and a ``dtype`` entry in meta.pkl or an
explicit ``bin_dtype`` overrides it.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from forge_dist.data.errors import DataError
from forge_dist.data.shards import DatasetMeta, write_dataset
from forge_dist.data.tokenizer import ByteTokenizer, CharTokenizer, ExternalTokenizer, TableTokenizer, Tokenizer

PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None), bytes)
BIN_FORMAT = "reallm_forge.bin"
SPLIT_NAMES = ("train", "val")
_SAMPLE = 1 << 20  # bytes hashed at each end of a .bin read in place


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only plain builtin values; any global (class, function) is refused by name."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module, name):
        raise DataError(f"{self.source} references {module}.{name}; meta.pkl may hold only plain values "
                        f"(dict, list, tuple, str, int, float, bool, None, bytes), so it is refused. "
                        f"Rewrite it with plain values, or prepare the text again with forge-prepare")

    def persistent_load(self, pid):
        raise DataError(f"{self.source} uses persistent ids, which a plain meta.pkl never does; refused")


def _check_plain(obj, source: str) -> None:
    """Reject any value outside PLAIN_TYPES (sets and the like come from opcodes, not globals)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if type(item) not in PLAIN_TYPES:
            raise DataError(f"{source} holds a {type(item).__name__}; only plain builtin values are allowed")
        if isinstance(item, (dict, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)


def load_meta_pkl(path: Union[str, Path]) -> dict:
    """Read a ReaLLM-Forge meta.pkl with the restricted unpickler; it must be a dict with vocab_size."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    try:
        meta = RestrictedUnpickler(data, str(path)).load()
    except DataError:
        raise
    except Exception as exc:  # a truncated or garbled pickle raises many different types
        raise DataError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc})") from exc
    _check_plain(meta, str(path))
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise DataError(f"{path} must be a dict with a positive integer 'vocab_size' (ReaLLM-Forge's meta.pkl)")
    return meta


def bin_dtype_for(meta: dict, override: Optional[str] = None) -> np.dtype:
    """The dtype upstream's prepare.py wrote the .bin files with (see the module docstring)."""
    name = override or meta.get("dtype") or ("uint32" if meta["vocab_size"] > 65535 else "uint16")
    if name not in ("uint16", "uint32"):
        raise DataError(f"token file dtype {name!r} is not supported; use uint16 or uint32")
    return np.dtype(name)


def _itos(meta: dict) -> dict:
    itos = meta.get("itos") or {}
    if not isinstance(itos, dict) or not all(isinstance(k, int) for k in itos):
        raise DataError("meta.pkl 'itos' must map integer ids to pieces")
    return itos


def _table(meta: dict, convert=lambda p: p, **kwargs) -> TableTokenizer:
    itos, vocab = _itos(meta), meta["vocab_size"]
    if any(not 0 <= i < vocab for i in itos):
        raise DataError(f"meta.pkl 'itos' has ids outside vocab_size {vocab}")
    return TableTokenizer([convert(itos[i]) if i in itos else None for i in range(vocab)], **kwargs)


def _sp_piece(piece: str):
    """A sentencepiece piece as text: "\u2581" is a space, <0xAB> a byte, control pieces nothing."""
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        return bytes([int(piece[3:5], 16)])
    return "" if piece in ("<unk>", "<s>", "</s>", "<pad>") else piece.replace("\u2581", " ")


def _sentencepiece(meta: dict, folder: Path, sp_model: Optional[Path]) -> Tokenizer:
    models = [sp_model] if sp_model else sorted(folder.glob("*.model"))
    if len(models) == 1:
        from forge_dist.data.spm import SentencePieceTokenizer

        tok = SentencePieceTokenizer.load(models[0])
        if tok.vocab_size != meta["vocab_size"]:
            raise DataError(f"{models[0].name} has {tok.vocab_size} pieces but meta.pkl says vocab_size "
                            f"{meta['vocab_size']}; pass the model the data was encoded with (--sp_model)")
        return tok
    why = "no .model file was found beside meta.pkl" if not models else f"several .model files: {models}"
    return _table(meta, _sp_piece, encodable=False,
                  note=f"{why}; copy the sentencepiece model there (upstream names it "
                       f"trained_spm_model.model) or pass --sp_model, and import again")


def _json_safe(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def tokenizer_from_upstream(meta: dict, folder: Union[str, Path] = ".", sp_model=None) -> Tokenizer:
    """Map upstream's tokenizer description in meta.pkl onto one of ours."""
    kind, vocab = meta.get("tokenizer"), meta["vocab_size"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        return _sentencepiece(meta, Path(folder), Path(sp_model) if sp_model else None)
    if kind in ("custom_char_with_byte_fallback", "json_byte_fallback"):
        return _table(meta)
    if kind is None:  # upstream's char or custom (token list) tokenizer
        itos = _itos(meta)
        chars = [itos.get(i) for i in range(vocab)]
        if all(isinstance(c, str) and len(c) == 1 for c in chars) and len(set(chars)) == vocab:
            return CharTokenizer(chars)
        return _table(meta)
    options = {k: v for k, v in meta.items() if k not in ("vocab_size", "tokenizer", "itos", "stoi",
                                                          "token_counts") and _json_safe(v)}
    itos = {i: p for i, p in _itos(meta).items() if isinstance(p, str)}
    return ExternalTokenizer(str(kind), vocab, options, itos)


def _bin_digest(path: Path) -> str:
    """Size plus sha256 of the first and last MiB: cheap enough to compute on every open."""
    size, digest = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(str(size).encode() + f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        digest.update(f.read(_SAMPLE))
    return "sampled-sha256:" + digest.hexdigest()


def read_upstream_folder(folder: Union[str, Path], bin_dtype: Optional[str] = None,
                         sp_model=None) -> Tuple[DatasetMeta, Tokenizer]:
    """Describe a ReaLLM-Forge folder as a DatasetMeta (format reallm_forge.bin), read in place."""
    folder = Path(folder)
    meta = load_meta_pkl(folder / "meta.pkl")
    dtype = bin_dtype_for(meta, bin_dtype)
    splits = {}
    for name in SPLIT_NAMES:
        path = folder / f"{name}.bin"
        if path.exists():
            size = path.stat().st_size
            if size % dtype.itemsize:
                raise DataError(f"{path} has {size} bytes, not a whole number of {dtype.name} tokens; "
                                f"pass the dtype it was written with (--bin_dtype)")
            splits[name] = {"file": path.name, "tokens": size // dtype.itemsize, "digest": _bin_digest(path)}
    if "train" not in splits:
        raise DataError(f"{folder} has meta.pkl but no train.bin; it is not a complete ReaLLM-Forge dataset")
    tokenizer = tokenizer_from_upstream(meta, folder, sp_model)
    info = DatasetMeta(vocab_size=meta["vocab_size"], dtype=dtype.name, tokenizer=tokenizer.spec(),
                       splits=splits, source={"kind": "reallm_forge", "tokenizer": meta.get("tokenizer")},
                       format=BIN_FORMAT)
    return info, tokenizer


def import_reallm_forge(src_dir: Union[str, Path], out_dir: Union[str, Path], bin_dtype: Optional[str] = None,
                        sp_model=None, overwrite: bool = False) -> DatasetMeta:
    """Convert a ReaLLM-Forge folder into a forge_dist dataset (Arrow shards + meta.json)."""
    src_dir = Path(src_dir)
    info, tokenizer = read_upstream_folder(src_dir, bin_dtype, sp_model)
    splits = {name: np.memmap(src_dir / s["file"], dtype=info.dtype, mode="r") if s["tokens"]
              else np.zeros(0, info.dtype) for name, s in info.splits.items()}
    source = {"kind": "reallm_forge", "from": src_dir.resolve().name, "tokenizer": info.source["tokenizer"]}
    return write_dataset(out_dir, tokenizer, splits, vocab_size=info.vocab_size, source=source,
                         overwrite=overwrite)

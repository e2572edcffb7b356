"""Token shards: one Arrow IPC file per split plus meta.json, written atomically, read by mmap.

Layout of a prepared dataset folder::

    meta.json        DatasetMeta: format version, vocab size, dtype, tokenizer spec, split sizes
    train.arrow      one column "tokens" (uint16 when every id fits, else uint32), one record batch
    val.arrow        same; absent when prepared with --val_fraction 0
    tokenizer.json | tokenizer.model   whatever the tokenizer's save() wrote

A split is a single record batch so that reading it is one zero-copy numpy view of the mapped
file: no token is copied into memory until a batch gathers it. Each split's sha256 is recorded
(``digest``), so the loader can tell a resumed run that its data changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from forge_dist.atomic import stays_inside
from forge_dist.data.errors import DataError

FORMAT = "forge_dist.tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
COLUMN = "tokens"
_HASH_CHUNK = 1 << 24  # tokens per hashing step, bounds the memory a hash of a mapped file touches


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
    except ImportError as exc:
        raise DataError("token shards need the pyarrow package: pip install pyarrow "
                        "(or pip install 'forge_dist[data]')") from exc
    return pyarrow


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    if not 0 < vocab_size <= 1 << 32:
        raise DataError(f"vocab_size {vocab_size} cannot be stored; it must be in 1 .. 2**32")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokens_sha256(tokens: np.ndarray) -> str:
    """sha256 of the little-endian token bytes, hashed in chunks (works on memory-mapped arrays)."""
    digest = hashlib.sha256()
    for start in range(0, len(tokens), _HASH_CHUNK):
        digest.update(np.ascontiguousarray(tokens[start:start + _HASH_CHUNK]).data)
    return digest.hexdigest()


def write_shard(path: Union[str, Path], tokens: np.ndarray, dtype: np.dtype) -> None:
    """Write ``tokens`` (already checked to fit ``dtype``) as one Arrow record batch, fsynced."""
    pa = _pyarrow()
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    schema = pa.schema([(COLUMN, pa.from_numpy_dtype(dtype))])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(tokens)], schema=schema))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def open_shard(path: Union[str, Path]) -> np.ndarray:
    """A read-only numpy view of a shard's tokens, backed by the memory-mapped file (no copy)."""
    pa = _pyarrow()
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read token shard {path}: {exc}; prepare the dataset again") from exc
    schema = reader.schema
    if schema.names != [COLUMN] or schema.field(0).type not in (pa.uint16(), pa.uint32()):
        raise DataError(f"{path} is not a forge_dist token shard (schema {schema}); prepare it again")
    if reader.num_record_batches == 1:
        return reader.get_batch(0).column(0).to_numpy(zero_copy_only=True)
    # Shards written by other tools may hold several batches; joining them costs one copy.
    return reader.read_all().column(0).combine_chunks().to_numpy()


@dataclass
class DatasetMeta:
    """What meta.json holds. ``splits`` maps a split name to {"file", "tokens", "digest"}."""

    vocab_size: int
    dtype: str
    tokenizer: dict
    splits: Dict[str, dict]
    source: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def fingerprint(self) -> str:
        """Identifies the token content: equal fingerprints mean identical batches for a seed."""
        key = {"vocab_size": self.vocab_size, "dtype": self.dtype,
               "splits": {k: [v["tokens"], v["digest"]] for k, v in sorted(self.splits.items())}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def split_tokens(self) -> Dict[str, int]:
        return {name: int(s["tokens"]) for name, s in self.splits.items()}

    def save(self, directory: Union[str, Path]) -> None:
        path = Path(directory, META_FILE)
        with open(path, "w", encoding="utf-8") as f:
            fields = asdict(self)
            head = {k: fields.pop(k) for k in ("format", "format_version")}
            json.dump({**head, **fields}, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "DatasetMeta":
        path = Path(directory, META_FILE)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {exc}; prepare the dataset again with forge-prepare") from exc
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} is format {raw.get('format')!r} version {raw.get('format_version')!r}; "
                            f"this forge_dist reads {FORMAT!r} version {FORMAT_VERSION}: prepare it again")
        try:
            meta = cls(**raw)
            token_dtype(meta.vocab_size)
            if meta.dtype not in ("uint16", "uint32") or not isinstance(meta.splits, dict):
                raise ValueError(f"dtype {meta.dtype!r}")
            meta.split_tokens()
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(f"{path} is malformed ({exc}); prepare the dataset again") from exc
        named = [s.get("file") for s in meta.splits.values()] + [(meta.tokenizer or {}).get("file", "tokenizer.json")]
        outside = [f for f in named if not stays_inside(f)]
        if outside:
            raise DataError(f"{path} is refused: it names {outside[0]!r}, a path outside the dataset folder")
        return meta


def write_dataset(out_dir: Union[str, Path], tokenizer, splits: Dict[str, np.ndarray],
                  vocab_size: Optional[int] = None, source: Optional[dict] = None,
                  overwrite: bool = False) -> DatasetMeta:
    """Write a dataset folder atomically: build it beside ``out_dir``, then rename it into place.

    ``tokenizer`` is a Tokenizer (saved into the folder); ``vocab_size`` defaults to its own.
    An existing ``out_dir`` is replaced only with ``overwrite``; a reader never sees a half folder.
    """
    out_dir = Path(out_dir)
    vocab = int(vocab_size or tokenizer.vocab_size)
    dtype = token_dtype(vocab)
    for name, tokens in splits.items():
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise DataError(f"split {name!r} holds token ids in [{int(tokens.min())}, {int(tokens.max())}], "
                            f"outside the vocabulary 0..{vocab - 1}; the data and its meta disagree")
    if _occupied(out_dir) and not overwrite:
        raise DataError(f"{out_dir} already exists; choose another --out_dir or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        table = {}
        for name, tokens in splits.items():
            write_shard(tmp / f"{name}.arrow", tokens, dtype)
            table[name] = {"file": f"{name}.arrow", "tokens": int(len(tokens)),
                           "digest": "sha256:" + tokens_sha256(open_shard(tmp / f"{name}.arrow"))}
        meta = DatasetMeta(vocab_size=vocab, dtype=dtype.name, tokenizer=tokenizer.save(tmp),
                           splits=table, source=dict(source or {}))
        meta.save(tmp)
        _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; with ``overwrite`` the old folder is moved aside first."""
    old = None
    if _occupied(out_dir) and overwrite:
        old = tmp.with_name(tmp.name + "-old")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:  # another process published first (the default corpus on many ranks)
        raise DataError(f"{out_dir} appeared while it was being written ({exc}); use it, or pass --overwrite") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()

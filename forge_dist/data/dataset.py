"""Opening datasets: a prepared folder (meta.json + Arrow shards) or a ReaLLM-Forge folder in place.

``resolve_dataset`` turns the trainer's ``--dataset`` value into a folder: a path, a name under
./data/ (upstream's layout), or the bundled corpus, prepared on first use.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from forge_dist.data.errors import DataError
from forge_dist.data.fables import DEFAULT_DATASET
from forge_dist.data.shards import META_FILE, DatasetMeta, open_shard
from forge_dist.data.tokenizer import Tokenizer
from forge_dist.data.tokenizers import tokenizer_from_spec

DATA_ROOT = "data"


def read_meta(data_dir: Union[str, Path]) -> DatasetMeta:
    """meta.json of a prepared folder, or the equivalent description of a ReaLLM-Forge folder."""
    data_dir = Path(data_dir)
    if (data_dir / META_FILE).exists():
        return DatasetMeta.load(data_dir)
    if (data_dir / "meta.pkl").exists():
        from forge_dist.data.meta_import import read_upstream_folder

        return read_upstream_folder(data_dir)[0]
    what = "does not exist" if not data_dir.exists() else "holds neither meta.json nor meta.pkl"
    raise DataError(f"dataset folder {data_dir} {what}; prepare it with forge-prepare (text files or "
                    f"--from_reallm_forge DIR)")


class TokenDataset:
    """One split as a read-only, memory-mapped token array plus the dataset's meta."""

    def __init__(self, tokens: np.ndarray, meta: DatasetMeta, split: str, path: Path):
        self.tokens, self.meta, self.split, self.path = tokens, meta, split, path

    @classmethod
    def open(cls, data_dir: Union[str, Path], split: str = "train") -> "TokenDataset":
        data_dir = Path(data_dir)
        meta = read_meta(data_dir)
        if split not in meta.splits:
            raise DataError(f"dataset {data_dir} has no {split!r} split (it has: {', '.join(meta.splits)}); "
                            f"prepare it with a --val_fraction above 0 or provide val.bin")
        entry = meta.splits[split]
        file = data_dir / entry["file"]
        if meta.format == "reallm_forge.bin":
            tokens = np.memmap(file, dtype=meta.dtype, mode="r") if entry["tokens"] else np.zeros(0, meta.dtype)
        else:
            tokens = open_shard(file)
        if len(tokens) != entry["tokens"] or tokens.dtype.name != meta.dtype:
            raise DataError(f"{file} holds {len(tokens)} {tokens.dtype.name} tokens but meta says "
                            f"{entry['tokens']} {meta.dtype}; the folder is inconsistent, prepare it again")
        return cls(tokens, meta, split, data_dir)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    def fingerprint(self) -> str:
        return self.meta.fingerprint()

    def tokenizer(self):
        return tokenizer_from_spec(self.meta.tokenizer, self.path)

    def __repr__(self) -> str:
        return f"TokenDataset({self.path.name}/{self.split}: {len(self)} tokens, vocab {self.vocab_size})"


def resolve_dataset(name_or_path: Optional[str] = None, data_root: Union[str, Path] = DATA_ROOT,
                    cache_dir: Union[str, Path, None] = None) -> Path:
    """The folder ``--dataset`` names: an existing path, ``data_root/<name>``, or the bundled corpus.

    The bundled corpus (``None``, "", "default" or DEFAULT_DATASET, when no such folder exists) is
    prepared into ``cache_dir`` on first use and reused afterwards.
    """
    name = os.fspath(name_or_path) if name_or_path else ""
    candidates = [Path(name), Path(data_root, name)] if name else []
    for folder in candidates:
        if folder.is_dir() and ((folder / META_FILE).exists() or (folder / "meta.pkl").exists()):
            return folder
    if name in ("", "default", DEFAULT_DATASET):
        from forge_dist.data.prepare import prepare_default_dataset

        return prepare_default_dataset(cache_dir)
    looked = " and ".join(str(c) for c in candidates)
    target = Path(name) if Path(name).parent != Path(".") or Path(name).is_absolute() else Path(data_root, name)
    raise DataError(f"dataset {name!r} not found (looked for {looked} with a meta.json or meta.pkl); "
                    f"prepare it with `forge-prepare --input FILE --out_dir {target}`, "
                    f"import a ReaLLM-Forge folder with --from_reallm_forge, or omit --dataset for the "
                    f"bundled corpus")


def load_tokenizer(data_dir: Union[str, Path]) -> Tokenizer:
    """The tokenizer of a prepared (or ReaLLM-Forge) dataset folder."""
    return tokenizer_from_spec(read_meta(data_dir).tokenizer, data_dir)

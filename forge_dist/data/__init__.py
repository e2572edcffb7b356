"""Data pipeline: tokenizers, Arrow token shards, ReaLLM-Forge import, the deterministic loader.

Names are imported on first use, so `forge-prepare` does not pay for importing torch.
"""
import importlib

_EXPORTS = {
    "DataError": "errors",
    "Tokenizer": "tokenizer", "CharTokenizer": "tokenizer", "ByteTokenizer": "tokenizer",
    "TableTokenizer": "tokenizer", "ExternalTokenizer": "tokenizer",
    "tokenizer_from_spec": "tokenizers", "load_tokenizer": "dataset",
    "SentencePieceTokenizer": "spm",
    "DatasetMeta": "shards", "token_dtype": "shards", "write_dataset": "shards", "open_shard": "shards",
    "TokenDataset": "dataset", "read_meta": "dataset", "resolve_dataset": "dataset",
    "DEFAULT_DATASET": "dataset",
    "BatchLoader": "loader",
    "prepare_text": "prepare", "prepare_default_dataset": "prepare",
    "import_reallm_forge": "meta_import", "load_meta_pkl": "meta_import",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'forge_dist.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"forge_dist.data.{_EXPORTS[name]}"), name)

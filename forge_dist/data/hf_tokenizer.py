"""A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library (kind ``huggingface``), so a
model imported from a transformers directory trains, samples and evaluates with its own tokenizer:

    forge-prepare --input my.txt --out_dir data/mine --tokenizer_from hf/   # hf/tokenizer.json
    forge-train --init_from prev_run --prev_run_ckpt hf/ --dataset data/mine

Ids are what ``AutoTokenizer(text, add_special_tokens=False)`` gives (no BOS/EOS added: training
text is a plain stream, as with our other kinds); decoding keeps special tokens. The whole
tokenizer.json travels in the spec, so checkpoints hold it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

from forge_dist.data.errors import DataError
from forge_dist.data.tokenizer import Tokenizer

FILE = "tokenizer.json"


class HuggingFaceTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, tokenizer_json: str):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError as exc:
            raise DataError("a Hugging Face tokenizer needs the tokenizers package: pip install transformers") from exc
        try:
            self._tok = Backend.from_str(tokenizer_json)
        except Exception as exc:  # the Rust library raises plain Exception subclasses
            raise DataError(f"not a valid tokenizer.json ({exc})") from None
        self.tokenizer_json = tokenizer_json

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "HuggingFaceTokenizer":
        path = Path(directory, FILE) if Path(directory).is_dir() else Path(directory)
        try:
            return cls(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}; give a transformers directory holding {FILE} "
                            f"(a fast tokenizer)") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def spec(self) -> dict:
        return {"kind": self.kind, "tokenizer_json": self.tokenizer_json}

    @classmethod
    def from_spec(cls, spec: dict, base_dir=None) -> "HuggingFaceTokenizer":
        return cls(spec["tokenizer_json"])

"""SentencePiece tokenizer: train BPE or unigram on the input text, or load an existing .model.

Training settings are chosen for exact round trips (decode(encode(text)) == text), which a
language model's samples need: identity normalisation, no dummy prefix, no whitespace folding,
"\n" as its own piece, every character covered, and byte fallback whenever the vocabulary has
room for it (sentencepiece needs vocab_size >= 256 + distinct characters + special pieces).
A loaded model keeps its own settings, so its round trips are only as exact as it was trained.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Iterator, List, Sequence, Union

from forge_dist.atomic import stays_inside
from forge_dist.data.errors import DataError
from forge_dist.data.tokenizer import Tokenizer

MODEL_FILE = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram")
_SPECIAL_PIECES = 4  # <unk>, <s>, </s> and the user-defined "\n"
_MAX_SENTENCE = 2000  # characters per training sentence; sentencepiece skips longer ones


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as exc:
        raise DataError("--tokenizer sentencepiece needs the sentencepiece package: "
                        "pip install sentencepiece (or pip install 'forge_dist[data]')") from exc
    return sentencepiece


def _sentences(text: str) -> Iterator[str]:
    for line in text.splitlines():
        for start in range(0, len(line), _MAX_SENTENCE):
            yield line[start:start + _MAX_SENTENCE]


def byte_fallback_min_vocab(text: str) -> int:
    """The smallest vocab_size for which training turns byte fallback on for ``text``."""
    return 256 + len(set(text) - {"\n"}) + _SPECIAL_PIECES


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self._sp = _sentencepiece().SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_proto)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"not a valid sentencepiece model ({exc}); pass a .model file written by "
                            f"sentencepiece training") from exc

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SentencePieceTokenizer":
        try:
            return cls(Path(path).read_bytes())
        except OSError as exc:
            raise DataError(f"cannot read sentencepiece model {path}: {exc}") from exc

    @classmethod
    def train(cls, text: str, vocab_size: int, model_type: str = "bpe",
              num_threads: int = 1) -> "SentencePieceTokenizer":
        """Train on ``text``. A tiny corpus may yield fewer pieces than asked (see vocab_size)."""
        if model_type not in MODEL_TYPES:
            raise DataError(f"--sp_model_type={model_type!r}; valid values: {', '.join(MODEL_TYPES)}")
        if not text.strip():
            raise DataError("cannot train sentencepiece on empty text; check the --input files")
        smallest = len(set(text) - {"\n"}) + _SPECIAL_PIECES
        if vocab_size < smallest:
            raise DataError(f"--vocab_size {vocab_size} is too small for this text: it has "
                            f"{smallest - _SPECIAL_PIECES} distinct characters, so use at least {smallest} "
                            f"(at least {byte_fallback_min_vocab(text)} for lossless byte fallback)")
        model = io.BytesIO()
        try:
            _sentencepiece().SentencePieceTrainer.train(
                sentence_iterator=_sentences(text), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, character_coverage=1.0,
                byte_fallback=vocab_size >= byte_fallback_min_vocab(text),
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
                user_defined_symbols=["\n"], hard_vocab_limit=False, num_threads=num_threads,
                minloglevel=2)
        except RuntimeError as exc:
            raise DataError(f"sentencepiece training failed: {exc}") from exc
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def byte_fallback(self) -> bool:
        """Whether unseen characters encode as bytes (else as <unk>, which loses them)."""
        return any(self._sp.IsByte(i) for i in range(self.vocab_size))

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._check_ids(ids))

    def spec(self) -> dict:
        return {"kind": self.kind, "model_b64": base64.b64encode(self.model_proto).decode("ascii")}

    def save(self, directory: Union[str, Path]) -> dict:
        Path(directory, MODEL_FILE).write_bytes(self.model_proto)  # the standard binary, usable by any tool
        return {"kind": self.kind, "model_file": MODEL_FILE}

    @classmethod
    def from_spec(cls, spec: dict, base_dir=None) -> "SentencePieceTokenizer":
        if "model_b64" in spec:
            return cls(base64.b64decode(spec["model_b64"]))
        if base_dir is None:
            raise DataError(f"sentencepiece spec refers to {spec['model_file']!r}; pass the dataset folder")
        if not stays_inside(spec["model_file"]):
            raise DataError(f"the sentencepiece spec in {base_dir} is refused: it names {spec['model_file']!r}, "
                            f"a path outside the dataset folder")
        return cls.load(Path(base_dir, spec["model_file"]))

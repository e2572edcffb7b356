"""Tokenizers behind one small interface, each rebuildable from a JSON spec.

A prepared dataset, a checkpoint and forge-sample must turn ids back into the same text, so every
tokenizer describes itself as a JSON-serialisable dict (``spec()``, self-contained, fit for a
checkpoint) and is rebuilt by ``tokenizer_from_spec`` (tokenizers.py). Inside a dataset folder the tokenizer lives
in its own file (``save``) and meta.json only names it.

Kinds: ``char`` (vocabulary from the data), ``byte`` (256 UTF-8 bytes), ``sentencepiece``
(spm.py), ``table`` (a ReaLLM-Forge id -> piece table: custom tokens, byte fallback) and
``external`` (a tokenizer we do not run, e.g. tiktoken: training on its ids works, encoding does not).
"""
from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from forge_dist.data.errors import DataError

SPEC_FILE = "tokenizer.json"
REPLACEMENT = "\ufffd"  # decoded for ids a table does not know


class Tokenizer(abc.ABC):
    kind: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id the tokenizer emits is below it."""

    @abc.abstractmethod
    def encode(self, text: str) -> List[int]:
        """Text -> ids; raises DataError for text this vocabulary cannot express."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text."""

    @abc.abstractmethod
    def spec(self) -> dict:
        """A self-contained JSON-serialisable description; ``tokenizer_from_spec`` inverts it."""

    def encode_array(self, text: str) -> np.ndarray:
        """Encode a whole corpus; kinds with a vectorised path override this."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def save(self, directory: Union[str, Path]) -> dict:
        """Write the tokenizer into a dataset folder; returns the small spec that meta.json holds."""
        Path(directory, SPEC_FILE).write_text(json.dumps(self.spec(), ensure_ascii=False), encoding="utf-8")
        return {"kind": self.kind, "file": SPEC_FILE}

    def _check_ids(self, ids: Sequence[int]) -> List[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"token id {bad[0]} is outside this {self.kind} tokenizer's vocabulary "
                            f"of {self.vocab_size}; the ids come from a different tokenizer or model")
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character, in the order given (sorted code points when built from text)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise DataError("a char tokenizer needs a non-empty list of distinct single characters")
        self.chars = chars
        points = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(points, kind="stable")  # sorted position -> id
        self._sorted = points[self._order]

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise DataError("cannot build a char vocabulary from empty text; check the --input files")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        pos = np.clip(np.searchsorted(self._sorted, points), 0, len(self._sorted) - 1)
        unknown = np.flatnonzero(self._sorted[pos] != points)
        if unknown.size:
            ch = text[int(unknown[0])]
            raise DataError(f"character {ch!r} (U+{ord(ch):04X}) is not in the char vocabulary of "
                            f"{self.vocab_size}; use text from the same corpus, or prepare the data "
                            f"with --tokenizer byte or sentencepiece (byte fallback)")
        return self._order[pos]

    def encode(self, text: str) -> List[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in self._check_ids(ids))

    def spec(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_spec(cls, spec: dict, base_dir=None) -> "CharTokenizer":
        return cls(spec["chars"])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids: never fails to encode; decoding replaces broken sequences."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode_array(self, text: Union[str, bytes]) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(self._check_ids(ids)).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_spec(cls, spec: dict, base_dir=None) -> "ByteTokenizer":
        return cls()


Piece = Union[str, bytes, None]


class TableTokenizer(Tokenizer):
    """An explicit id -> piece table, as ReaLLM-Forge's custom tokenizers store in meta.pkl.

    Pieces are strings, raw bytes (a single byte is a fallback for text no string piece covers)
    or None (an id without a piece, decoded as U+FFFD). Encoding follows upstream: at each
    position the first string piece in id order that matches wins, else the character's UTF-8
    bytes if the table has byte pieces. ``encodable=False`` marks tables that only decode.
    """

    kind = "table"

    def __init__(self, pieces: Sequence[Piece], encodable: bool = True, note: str = ""):
        if not pieces:
            raise DataError("a table tokenizer needs at least one piece")
        self.pieces = list(pieces)
        self.encodable, self.note = encodable, note
        self._bytes = {p[0]: i for i, p in enumerate(self.pieces) if isinstance(p, bytes) and len(p) == 1}
        self._by_first: Dict[str, List[tuple]] = {}
        for i, p in enumerate(self.pieces):
            if isinstance(p, str) and p:
                self._by_first.setdefault(p[0], []).append((p, i))

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> List[int]:
        if not self.encodable:
            raise DataError(f"this imported tokenizer can only decode: {self.note}")
        ids, pos = [], 0
        while pos < len(text):
            for piece, i in self._by_first.get(text[pos], ()):
                if text.startswith(piece, pos):
                    ids.append(i)
                    pos += len(piece)
                    break
            else:
                raw = text[pos].encode("utf-8")
                if not all(b in self._bytes for b in raw):
                    raise DataError(f"character {text[pos]!r} is not covered by this token table "
                                    f"and it has no byte fallback; remove it from the text")
                ids.extend(self._bytes[b] for b in raw)
                pos += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in self._check_ids(ids):
            piece = self.pieces[i]
            out += piece if isinstance(piece, bytes) else (REPLACEMENT if piece is None else piece).encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def spec(self) -> dict:
        pieces = [{"hex": p.hex()} if isinstance(p, bytes) else p for p in self.pieces]
        return {"kind": self.kind, "pieces": pieces, "encodable": self.encodable, "note": self.note}

    @classmethod
    def from_spec(cls, spec: dict, base_dir=None) -> "TableTokenizer":
        pieces = [bytes.fromhex(p["hex"]) if isinstance(p, dict) else p for p in spec["pieces"]]
        return cls(pieces, spec.get("encodable", True), spec.get("note", ""))


class ExternalTokenizer(Tokenizer):
    """A tokenizer forge_dist does not run (tiktoken, Hugging Face, ...), kept by name.

    Training on the imported ids needs only ``vocab_size``. Decoding uses the partial id -> text
    table upstream saved when there is one (ids without an entry decode as U+FFFD); encoding
    text (a sampling prompt) is refused with what would be needed.
    """

    kind = "external"

    def __init__(self, name: str, vocab_size: int, options: Optional[dict] = None,
                 pieces: Optional[Dict[int, str]] = None):
        self.name, self._vocab_size = name, int(vocab_size)
        self.options = dict(options or {})
        self.pieces = {int(k): v for k, v in (pieces or {}).items()}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> List[int]:
        raise DataError(f"encoding text needs the {self.name!r} tokenizer ({self.options}), which "
                        f"forge_dist does not run; training and evaluation on the imported token ids "
                        f"work without it")

    def decode(self, ids: Sequence[int]) -> str:
        if not self.pieces:
            raise DataError(f"decoding needs the {self.name!r} tokenizer; this dataset holds no "
                            f"id -> text table for it")
        return "".join(self.pieces.get(i, REPLACEMENT) for i in self._check_ids(ids))

    def spec(self) -> dict:
        return {"kind": self.kind, "name": self.name, "vocab_size": self._vocab_size,
                "options": self.options, "pieces": {str(k): v for k, v in sorted(self.pieces.items())}}

    @classmethod
    def from_spec(cls, spec: dict, base_dir=None) -> "ExternalTokenizer":
        return cls(spec["name"], spec["vocab_size"], spec.get("options"), spec.get("pieces"))

"""Tokenizers, Arrow shards, meta.json, the restricted unpickler, ReaLLM-Forge import, the corpus."""
import json
import pickle
import struct

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")

from forge_dist.data import (  # noqa: E402
    ByteTokenizer, CharTokenizer, DataError, DatasetMeta, ExternalTokenizer, TableTokenizer, TokenDataset,
    import_reallm_forge, load_meta_pkl, load_tokenizer, open_shard, prepare_default_dataset, prepare_text,
    read_meta, resolve_dataset, token_dtype, tokenizer_from_spec, write_dataset)
from forge_dist.data import fables  # noqa: E402
from forge_dist.data.prepare import CORPUS, main as prepare_main  # noqa: E402

TEXT = fables.generate(size=20_000, seed=7)
ODD = "Zebra quartz \u00e9t\u00e9 \u2603 \u4e2d\u6587 \t tabs\n\n  spaces  \n"  # unseen characters


def roundtrip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    return ids


# --- tokenizers ---------------------------------------------------------------------------------

def test_char_tokenizer_roundtrip_spec_and_unknown_char(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    assert tok.chars == sorted(set(TEXT)) and tok.vocab_size == len(set(TEXT))
    ids = roundtrip(tok, TEXT[:500])
    assert ids == [tok.chars.index(c) for c in TEXT[:500]]
    unsorted = CharTokenizer(["b", "a", "\n"])  # upstream tables need not be sorted
    assert unsorted.encode("ab\n") == [1, 0, 2]
    for again in (tokenizer_from_spec(json.loads(json.dumps(tok.spec()))),
                  tokenizer_from_spec(tok.save(tmp_path), tmp_path)):
        assert again.encode(TEXT[:500]) == ids
    with pytest.raises(DataError, match="U\\+2603.*not in the char vocabulary"):
        tok.encode("snow \u2603")
    with pytest.raises(DataError, match="outside"):
        tok.decode([tok.vocab_size])


def test_byte_tokenizer_roundtrip_any_text():
    tok = ByteTokenizer()
    ids = roundtrip(tok, ODD)
    assert ids == list(ODD.encode("utf-8")) and tok.vocab_size == 256
    assert tok.encode_array(b"\xff\x00").tolist() == [255, 0]  # raw bytes for --tokenizer byte
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # a cut UTF-8 sequence decodes, replaced
    assert isinstance(tokenizer_from_spec(tok.spec()), ByteTokenizer)


@pytest.mark.parametrize("model_type,vocab", [("bpe", 400), ("unigram", 120)])
def test_sentencepiece_train_roundtrip_and_reload(tmp_path, model_type, vocab):
    from forge_dist.data.spm import SentencePieceTokenizer, byte_fallback_min_vocab

    tok = SentencePieceTokenizer.train(TEXT, vocab, model_type)
    assert 0 < tok.vocab_size <= vocab  # a tiny unigram corpus may give fewer pieces than asked
    ids = roundtrip(tok, TEXT[:2000])
    assert len(ids) < 2000  # merges happened: fewer tokens than characters
    assert tok.byte_fallback == (vocab >= byte_fallback_min_vocab(TEXT))
    if tok.byte_fallback:
        roundtrip(tok, ODD)  # unseen characters survive through byte pieces
    path = tmp_path / "m.model"
    path.write_bytes(tok.model_proto)
    for again in (SentencePieceTokenizer.load(path), tokenizer_from_spec(tok.spec()),
                  tokenizer_from_spec(tok.save(tmp_path), tmp_path)):
        assert again.encode(TEXT[:2000]) == ids


def test_sentencepiece_errors_name_the_fix(tmp_path):
    from forge_dist.data.spm import SentencePieceTokenizer

    with pytest.raises(DataError, match="--vocab_size 5 is too small.*at least"):
        SentencePieceTokenizer.train(TEXT, 5)
    with pytest.raises(DataError, match="sp_model_type"):
        SentencePieceTokenizer.train(TEXT, 100, "wordpiece")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid sentencepiece model"):
        SentencePieceTokenizer.load(bad)


def test_table_tokenizer_follows_upstream_first_match_and_byte_fallback():
    pieces = [bytes([b]) for b in range(256)] + ["th", "the", "e", " "]
    tok = TableTokenizer(pieces)
    assert tok.encode("the") == [256, 258]  # first match in id order ("th"), not the longest
    assert tok.encode("\u00e9") == [0xC3, 0xA9]  # no piece covers it: its UTF-8 bytes
    roundtrip(tok, "the \u00e9t\u00e9 th")
    assert tokenizer_from_spec(json.loads(json.dumps(tok.spec()))).encode("the \u00e9") == tok.encode("the \u00e9")
    with pytest.raises(DataError, match="no byte fallback"):
        TableTokenizer(["a", "b"]).encode("abc")
    with pytest.raises(DataError, match="only decode: missing model"):
        TableTokenizer(["a"], encodable=False, note="missing model").encode("a")


def test_tokenizer_spec_errors():
    with pytest.raises(DataError, match="unknown tokenizer kind 'wordpiece'"):
        tokenizer_from_spec({"kind": "wordpiece"})
    with pytest.raises(DataError, match="malformed char tokenizer spec"):
        tokenizer_from_spec({"kind": "char"})
    with pytest.raises(DataError, match="pass the dataset folder"):
        tokenizer_from_spec({"kind": "char", "file": "tokenizer.json"})


# --- shards and metadata --------------------------------------------------------------------------

def test_token_dtype_boundaries():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32 and token_dtype(100277) == np.uint32
    with pytest.raises(DataError):
        token_dtype(0)


@pytest.mark.parametrize("vocab,dtype", [(1000, "uint16"), (70_000, "uint32")])
def test_write_dataset_dtype_and_zero_copy_mmap(tmp_path, vocab, dtype):
    ids = np.random.default_rng(0).integers(0, vocab, size=5000)
    ids[0] = vocab - 1
    meta = write_dataset(tmp_path / "ds", ExternalTokenizer("test", vocab), {"train": ids[:4000], "val": ids[4000:]})
    assert meta.dtype == dtype and meta.split_tokens() == {"train": 4000, "val": 1000}
    before = pa.total_allocated_bytes()
    tokens = open_shard(tmp_path / "ds" / "train.arrow")
    assert pa.total_allocated_bytes() == before  # nothing was read into arrow's memory pool
    assert tokens.dtype == np.dtype(dtype) and not tokens.flags.writeable and not tokens.flags.owndata
    np.testing.assert_array_equal(tokens, ids[:4000])
    ds = TokenDataset.open(tmp_path / "ds", "val")
    np.testing.assert_array_equal(ds.tokens, ids[4000:])


def test_meta_json_contents_fingerprint_and_errors(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    meta = prepare_text([_write(tmp_path / "a.txt", TEXT)], tmp_path / "ds", val_fraction=0.25)
    raw = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert raw["format"] == "forge_dist.tokens" and raw["format_version"] == 1
    assert raw["vocab_size"] == tok.vocab_size and raw["dtype"] == "uint16"
    assert raw["tokenizer"] == {"kind": "char", "file": "tokenizer.json"}
    assert raw["splits"]["train"]["tokens"] + raw["splits"]["val"]["tokens"] == len(TEXT)
    assert raw["splits"]["val"]["tokens"] == len(TEXT) // 4 and raw["source"]["files"] == ["a.txt"]
    assert read_meta(tmp_path / "ds") == meta and load_tokenizer(tmp_path / "ds").chars == tok.chars
    other = prepare_text([_write(tmp_path / "b.txt", TEXT[:-1] + "!")], tmp_path / "ds2", val_fraction=0.25)
    assert other.fingerprint() != meta.fingerprint()
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        prepare_text([tmp_path / "a.txt"], tmp_path / "ds")
    prepare_text([tmp_path / "a.txt"], tmp_path / "ds", val_fraction=0.5, overwrite=True)
    assert read_meta(tmp_path / "ds").split_tokens()["val"] == len(TEXT) // 2
    raw["format_version"] = 99
    (tmp_path / "ds" / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="version 99.*prepare it again"):
        read_meta(tmp_path / "ds")
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "nowhere")


# --- the restricted unpickler -----------------------------------------------------------------------

CALLED = []


def _record_call(*args):
    CALLED.append(args)


class Payload:
    def __reduce__(self):
        return (_record_call, ("pwned",))


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_accepts_plain_meta(tmp_path, protocol):
    meta = {"vocab_size": 65, "itos": {0: "\n", 1: "a"}, "stoi": {"\n": 0, "a": 1}, "chars": ["\n", "a"],
            "nested": ({"x": [1.5, None, True]},), "tokenizer": None}
    if protocol >= 3:  # older protocols pickle bytes through a function call, which is refused
        meta["itos_bytes"] = {0: b"\x00\xff"}
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(meta, protocol=protocol))
    assert load_meta_pkl(path) == meta


@pytest.mark.parametrize("blob,match", [
    (pickle.dumps({"vocab_size": 3, "x": Payload()}), "references .*_record_call.*refused"),
    (b"cos\nsystem\n(S'echo unsafe'\ntR.", "references os.system"),  # hand-written opcodes
    (b"c" + __name__.encode() + b"\n_record_call\n(S'x'\ntR.", "references .*_record_call"),
    (pickle.dumps({"vocab_size": 3, "s": {1, 2}}, protocol=4), "holds a set"),  # no global needed
    (pickle.dumps({"vocab_size": 3})[:-3], "not a readable pickle"),
    (pickle.dumps([1, 2]), "must be a dict"),
], ids=["class-instance", "os-system-opcodes", "test-function", "set", "truncated", "not-a-dict"])
def test_restricted_unpickler_refuses_anything_else(tmp_path, blob, match):
    path = tmp_path / "meta.pkl"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=match):
        load_meta_pkl(path)
    assert CALLED == []  # nothing ran


# --- ReaLLM-Forge folders ---------------------------------------------------------------------------

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _upstream_folder(folder, meta, train, val, dtype):
    folder.mkdir()
    np.asarray(train, dtype=dtype).tofile(folder / "train.bin")
    np.asarray(val, dtype=dtype).tofile(folder / "val.bin")
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return folder


def test_import_reallm_forge_char_folder_roundtrip(tmp_path):
    chars = sorted(set(TEXT))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = [stoi[c] for c in TEXT]
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi, "chars": chars}
    src = _upstream_folder(tmp_path / "shakespeare_char", meta, ids[:18000], ids[18000:], np.uint16)
    out = import_reallm_forge(src, tmp_path / "imported")
    assert out.source["kind"] == "reallm_forge" and out.split_tokens() == {"train": 18000, "val": len(ids) - 18000}
    for folder in (tmp_path / "imported", src):  # imported copy, and the upstream folder read in place
        train, val = TokenDataset.open(folder, "train"), TokenDataset.open(folder, "val")
        np.testing.assert_array_equal(train.tokens, ids[:18000])
        assert train.tokenizer().decode(val.tokens.tolist()) == TEXT[18000:]
        assert isinstance(load_tokenizer(folder), CharTokenizer)
    assert TokenDataset.open(src).fingerprint() == TokenDataset.open(src).fingerprint()


def test_import_large_vocab_is_uint32_and_keeps_tiktoken_by_name(tmp_path):
    ids = np.array([0, 70_000, 100_276, 5, 6, 7], dtype=np.uint32)
    meta = {"vocab_size": 100277, "tokenizer": "tiktoken", "tiktoken_encoding": "cl100k_base",
            "itos": {0: "!", 5: "&", 6: "'", 7: "(", 70_000: " hello"}}
    src = _upstream_folder(tmp_path / "owt", meta, ids, ids[::-1], np.uint32)
    out = import_reallm_forge(src, tmp_path / "out")
    assert out.dtype == "uint32"
    np.testing.assert_array_equal(TokenDataset.open(tmp_path / "out").tokens, ids)
    tok = load_tokenizer(tmp_path / "out")
    assert tok.vocab_size == 100277 and tok.options["tiktoken_encoding"] == "cl100k_base"
    assert tok.decode([0, 70_000, 8]) == "! hello\ufffd"  # partial upstream table; unknown ids replaced
    with pytest.raises(DataError, match="needs the 'tiktoken' tokenizer.*training"):
        tok.encode("hello")


def test_import_sentencepiece_and_byte_fallback_folders(tmp_path):
    from forge_dist.data.spm import SentencePieceTokenizer

    sp = SentencePieceTokenizer.train(TEXT, 400)
    ids = sp.encode(TEXT)
    itos = {i: sp._sp.id_to_piece(i) for i in range(sp.vocab_size)}
    meta = {"vocab_size": sp.vocab_size, "tokenizer": "sentencepiece", "itos": itos,
            "stoi": {p: i for i, p in itos.items()}}
    src = _upstream_folder(tmp_path / "spm", meta, ids[:3000], ids[3000:], np.uint16)
    table = load_tokenizer(src)  # no .model beside meta.pkl: decodes from itos, refuses to encode
    assert isinstance(table, TableTokenizer) and table.decode(ids[:300]) == sp.decode(ids[:300])
    with pytest.raises(DataError, match="trained_spm_model.model"):
        table.encode("the")
    (src / "trained_spm_model.model").write_bytes(sp.model_proto)
    assert load_tokenizer(src).encode(TEXT[:200]) == sp.encode(TEXT[:200])
    meta = {"vocab_size": 258, "tokenizer": "custom_char_with_byte_fallback",
            "itos": {**{b: bytes([b]) for b in range(256)}, 256: "the ", 257: "fox"}}
    src = _upstream_folder(tmp_path / "cbf", meta, [256, 257, 33], [256], np.uint16)
    tok = load_tokenizer(src)
    assert tok.encode("the fox!") == [256, 257, 33] and tok.decode([256, 257, 33]) == "the fox!"


def test_import_errors_are_clear(tmp_path):
    src = _upstream_folder(tmp_path / "bad", {"vocab_size": 10}, [1, 2, 30], [1], np.uint16)
    with pytest.raises(DataError, match=r"token ids in \[1, 30\], outside the vocabulary 0..9"):
        import_reallm_forge(src, tmp_path / "out")
    with open(src / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        import_reallm_forge(src, tmp_path / "out")
    (src / "train.bin").unlink()
    with pytest.raises(DataError, match="no train.bin"):
        import_reallm_forge(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- command line, bundled corpus, dataset resolution -------------------------------------------------

def test_prepare_cli_writes_dataset_and_refuses_bad_options(tmp_path, capsys):
    inp = _write(tmp_path / "in.txt", TEXT)
    assert prepare_main(["--input", str(inp), "--out_dir", str(tmp_path / "sp"), "--tokenizer",
                         "sentencepiece", "--vocab_size", "300", "--sp_model_type", "unigram"]) == 0
    assert "tokenizer sentencepiece" in capsys.readouterr().out
    assert (tmp_path / "sp" / "tokenizer.model").exists()
    assert prepare_main(["--input", str(inp), "--out_dir", str(tmp_path / "sp2"), "--tokenizer", "sentencepiece",
                         "--sp_model", str(tmp_path / "sp" / "tokenizer.model")]) == 0
    assert (TokenDataset.open(tmp_path / "sp2").tokens == TokenDataset.open(tmp_path / "sp").tokens).all()
    capsys.readouterr()
    assert prepare_main(["--input", str(inp), "--out_dir", str(tmp_path / "c"), "--vocab_size", "50"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vocab_size and --sp_model apply only to --tokenizer sentencepiece" in err
    _write(tmp_path / "latin1.txt", "")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert prepare_main(["--input", str(tmp_path / "latin1.txt"), "--out_dir", str(tmp_path / "l")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert prepare_main(["--input", str(tmp_path / "latin1.txt"), "--out_dir", str(tmp_path / "l"),
                         "--tokenizer", "byte", "--val_fraction", "0"]) == 0
    assert read_meta(tmp_path / "l").split_tokens() == {"train": 4}


def test_bundled_corpus_is_reproducible_and_prepares_once(tmp_path):
    text = CORPUS.read_text(encoding="utf-8")
    assert text == fables.generate()  # the shipped file is exactly the generator's output
    assert 300_000 <= len(text.encode()) <= 1_000_000 and "Moral:" in text
    folder = prepare_default_dataset(tmp_path)
    stamp = (folder / "train.arrow").stat().st_mtime_ns
    assert prepare_default_dataset(tmp_path) == folder  # cached: not written again
    assert (folder / "train.arrow").stat().st_mtime_ns == stamp
    train = TokenDataset.open(folder, "train")
    assert load_tokenizer(folder).decode(train.tokens[:2000].tolist()) == text[:2000]
    assert resolve_dataset(None, data_root=tmp_path / "data", cache_dir=tmp_path) == folder
    assert resolve_dataset(str(folder), data_root=tmp_path / "data") == folder


def test_resolve_dataset_names_and_missing(tmp_path):
    prepare_text([_write(tmp_path / "a.txt", TEXT)], tmp_path / "data" / "mine")
    assert resolve_dataset("mine", data_root=tmp_path / "data") == tmp_path / "data" / "mine"
    with pytest.raises(DataError, match="dataset 'shakespeare_char' not found.*forge-prepare"):
        resolve_dataset("shakespeare_char", data_root=tmp_path / "data")
    prepare_text([tmp_path / "a.txt"], tmp_path / "noval", val_fraction=0)
    with pytest.raises(DataError, match="has no 'val' split"):
        TokenDataset.open(tmp_path / "noval", "val")


def test_meta_dataclass_rejects_malformed(tmp_path):
    folder = tmp_path / "ds"
    prepare_text([_write(tmp_path / "a.txt", TEXT)], folder)
    raw = json.loads((folder / "meta.json").read_text())
    raw["dtype"] = "float32"
    (folder / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="malformed"):
        DatasetMeta.load(folder)
    (folder / "train.arrow").write_bytes(struct.pack("<I", 7))
    with pytest.raises(DataError, match="cannot read token shard"):
        open_shard(folder / "train.arrow")

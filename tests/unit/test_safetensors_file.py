"""io/safetensors_file.py reads the same bits as safetensors' own get_slice, without mapping the file."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from forge_dist.io import safetensors_file
from forge_dist.io.safetensors_file import SafetensorsFile

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]
SHAPES = [(), (1,), (7,), (5, 3), (3, 1, 4), (2, 3, 5, 2), (4, 0)]


def _tensor(shape, dtype, g):
    bits = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8, generator=g)
    t = bits.view(dtype) if dtype != torch.bool else bits % 2 == 1
    return t.reshape(shape)


def _bits(t):
    """The raw bytes (NaN payloads and float8 compared exactly)."""
    return t.contiguous().reshape(-1).view(torch.uint8).tolist()


def _blocks(shape, g):
    """Random sub-ranges per dimension (empty, whole and open-ended ones included), fewer indices
    than dimensions too."""
    out = [tuple(slice(None) for _ in shape), tuple(slice(1, None) for _ in shape), (slice(0, 1),)]
    for _ in range(40):
        index = []
        for n in shape:
            a, b = sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())
            index.append(slice(a, b))
        out.append(tuple(index))
    return out


@pytest.mark.parametrize("chunk,short", [(4 * 300 * 2, 1 << 16), (1 << 22, 0)])  # via scratch; row by row
def test_blocks_equal_safetensors_get_slice(tmp_path, monkeypatch, chunk, short):
    g = torch.Generator().manual_seed(0)
    state = {f"{str(dt)[6:]}_{i}": _tensor(s, dt, g) for dt in DTYPES for i, s in enumerate(SHAPES)}
    state["wide"] = _tensor((9, 300), torch.float32, g)  # short rows: through the scratch buffer
    path = str(tmp_path / "t.safetensors")
    save_file(state, path, metadata={"k": "v"})
    monkeypatch.setattr(safetensors_file, "CHUNK", chunk)  # 2 rows of "wide" a chunk: several chunks
    monkeypatch.setattr(safetensors_file, "SHORT", short)
    with safe_open(path, framework="pt", device="cpu") as ref, SafetensorsFile(path) as ours:
        assert sorted(ours.keys()) == sorted(ref.keys())
        assert ours.metadata() == ref.metadata()
        for name in ref.keys():
            shape = ref.get_slice(name).get_shape()
            assert ours.get_slice(name).get_shape() == shape
            whole, want = ours.get_tensor(name), ref.get_tensor(name)
            assert whole.dtype == want.dtype == state[name].dtype and _bits(whole) == _bits(want), name
            for index in _blocks(shape, g) if shape else []:
                got, want = ours.get_slice(name)[index], ref.get_slice(name)[index]
                assert got.shape == want.shape and got.dtype == want.dtype, (name, index)
                assert _bits(got) == _bits(want), (name, index)
        for index in [(slice(0, 9), slice(7, 19)), (slice(2, 7), slice(0, 300)), (slice(3, 4), slice(299, 300))]:
            assert _bits(ours.get_slice("wide")[index]) == _bits(ref.get_slice("wide")[index])
    assert ours._fd is None  # closed on exit


def test_malformed_files_are_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    def file(header: bytes, data: bytes = b"") -> bytes:
        return len(header).to_bytes(8, "little") + header + data

    for data in [b"\x01", (10**6).to_bytes(8, "little") + b"{}", file(b"[]"), file(b"{nope"),
                 file(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'),  # data past the end
                 file(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}', bytes(16)),  # wrong size
                 file(b'{"a":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
                 file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":["x",4]}}', bytes(4)),
                 file(b'{"__metadata__":["x"],"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
                 file(b'{"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
                 file(b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[4,0]}}', bytes(4))]:  # as safetensors refuses
        path.write_bytes(data)
        with pytest.raises(ValueError):
            SafetensorsFile(str(path))

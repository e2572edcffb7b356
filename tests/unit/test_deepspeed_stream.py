"""The tensor-by-tensor safetensors writer of forge-convert's DeepSpeed path (io/deepspeed_stream.py)
writes the bytes safetensors' save_file writes; the DeepSpeed checkpoints themselves are tested in
tests/dist/test_deepspeed_dp.py (test_forge_convert_streams_zero_checkpoints_one_tensor_at_a_time)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from forge_dist.errors import CheckpointError
from forge_dist.io.deepspeed_stream import _span, write_safetensors


def _parts(file):
    with open(file, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:], n


def test_streamed_safetensors_equal_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"w.b": torch.randn(3, 5, generator=g), "a": torch.randn(7, generator=g, dtype=torch.float64),
             "mask": torch.rand(4, generator=g) > 0.5, "h": torch.randn(2, 3, generator=g).to(torch.bfloat16),
             "idx": torch.arange(5), "s": torch.randn((), generator=g)}
    meta = {"format": "pt", "forge_dist.aliases": json.dumps({"x": "a"})}
    save_file(state, str(tmp_path / "ref.safetensors"), metadata=meta)
    asked = []
    write_safetensors(str(tmp_path / "out.safetensors"), {n: (t.dtype, tuple(t.shape)) for n, t in state.items()},
                      lambda n: asked.append(n) or state[n].clone(), meta)
    assert _parts(tmp_path / "out.safetensors") == _parts(tmp_path / "ref.safetensors")
    assert sorted(asked) == sorted(state)  # each asked for once


def test_a_value_of_the_wrong_shape_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="expected"):
        write_safetensors(str(tmp_path / "x"), {"a": (torch.float32, (2,))}, lambda n: torch.zeros(3), {})


def test_span_crosses_partition_boundaries_and_refuses_a_short_one():
    flats = [torch.arange(0, 4.0), torch.arange(4, 6.0), torch.arange(6, 10.0)]
    assert torch.equal(torch.cat(_span(flats, 3, 5)), torch.arange(3, 8.0))
    with pytest.raises(CheckpointError, match="truncated"):
        _span(flats, 8, 4)


def test_a_dtype_safetensors_cannot_hold_is_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match=r"torch\.uint16.*valid"):
        write_safetensors(str(tmp_path / "x"), {"a": (torch.uint16, (2,))}, lambda n: torch.zeros(2), {})
    assert not (tmp_path / "x").exists()

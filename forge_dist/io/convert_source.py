"""Where forge-convert's source is: a forge-train out_dir / checkpoint (verified first) or a file.

Shared by the whole-model path (io/convert.py) and the streamed one (io/stream_export.py).
"""
from __future__ import annotations

import os

from forge_dist.io import checkpoint_read, deepspeed_ckpt


def find_source(src: str):
    """(path to load, is it a DeepSpeed checkpoint, training info found beside it). A forge-train
    out_dir, its checkpoints/ folder or one checkpoints/iter_N is verified against its manifest
    first (a flipped byte is refused, never converted); its tokenizer and data_dir travel along."""
    found = checkpoint_read.find_training_checkpoint(src, retry=checkpoint_read.CONVERT_RETRY)
    if found is None:
        return src, deepspeed_ckpt.is_deepspeed_checkpoint(src), {}
    checkpoint_read.verify_checkpoint(found, retry=checkpoint_read.CONVERT_RETRY)
    state = checkpoint_read.load_trainer_state(found)
    extra = {key: state[key] for key in ("tokenizer", "data_dir") if state.get(key)}  # older model/ lacks them
    if deepspeed_ckpt.is_deepspeed_checkpoint(found):  # ZeRO shards: model/ may hold a partition only
        return found, True, extra
    return os.path.join(found, checkpoint_read.MODEL_DIR), False, extra

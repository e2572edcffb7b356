"""forge-convert: between forge_dist's checkpoint directory, ReaLLM-Forge's ckpt.pt and transformers.

    forge-convert out converted/ --to forge                   # a forge-train out_dir (its latest checkpoint)
    forge-convert out/checkpoints/iter_0000500 m500/ --to reallm-forge   # one checkpoint of it
    forge-convert out-tp2x2 consolidated/ --to forge          # a sharded (DCP) checkpoint -> one safetensors
    forge-convert out/ckpt.pt converted/ --to forge           # ReaLLM-Forge -> forge_dist
    forge-convert converted/ out2/ --to reallm-forge          # -> out2/ckpt.pt (or DST.pt)
    forge-convert out/checkpoints/iter_0000100 model/ --to forge   # a DeepSpeed checkpoint (ZeRO 0-3, any TP)
    forge-convert converted/ hf/ --to hf --dataset shakespeare_char  # -> transformers (+ tokenizer)
    forge-convert hf/ back/ --to forge                        # a transformers directory (safetensors)

The source format is detected; a forge-train checkpoint is verified against its checksums first.
Weights and the model configuration convert exactly; iter_num, best_val_loss, the tokenizer and
ReaLLM-Forge's run ``config`` travel along; optimizer state does not. Every source (DeepSpeed,
sharded, a model directory, a ReaLLM-Forge ckpt.pt memory-mapped, a transformers directory read
block by block, io/safetensors_file.py) goes to every target one tensor at a time
(io/stream_export.py), never whole in memory; ``load_source`` (the whole model) is the library's and the tests' reference.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.io import deepspeed_ckpt, forge_format, reallm_forge
from forge_dist.io.convert_source import find_source  # noqa: F401  (forge-convert's source lookup)
from forge_dist.io.pretrained import load_any

TARGETS = ("forge", "reallm-forge", "hf")


def load_source(src: str):
    """(model, training info) of ``src`` (see find_source)."""
    path, is_deepspeed, extra = find_source(src)
    model, training = (deepspeed_ckpt.load_deepspeed if is_deepspeed else load_any)(path)
    training = dict(training)
    for key, value in extra.items():
        if not training.get(key):
            training[key] = value
    return model, training


def convert(src: str, dst: str, to: str, layout: str = "snapshot", tokenizer=None) -> str:
    """Convert ``src`` (any format) into ``dst`` in format ``to``; returns what was written.
    ``layout`` picks upstream's spelling for --to reallm-forge (see reallm_forge.LAYOUTS);
    ``tokenizer`` (a forge_dist Tokenizer) goes along with --to hf."""
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r} is not a checkpoint format; valid values: {', '.join(TARGETS)}")
    dst = os.fspath(dst)
    written = _convert_streamed(src, dst, to, layout, tokenizer)
    if written is not None:
        return written
    model, training = load_source(os.fspath(src))
    if to == "forge":
        forge_format.save_pretrained(model, dst, training=training)
        return dst
    if to == "hf":
        from forge_dist.data.tokenizers import tokenizer_from_spec
        from forge_dist.io.hf import save_hf

        if tokenizer is None and training.get("tokenizer"):
            tokenizer = tokenizer_from_spec(training["tokenizer"])
        return save_hf(model, dst, tokenizer=tokenizer)
    return reallm_forge.save_ckpt(model, dst, training=training, layout=layout)


def _convert_streamed(src: str, dst: str, to: str, layout: str, tokenizer) -> Optional[str]:
    """Any target from any source, tensor by tensor (io/stream_export.py); None where an export
    rule registered for --to reallm-forge cannot be planned without the values."""
    from forge_dist.io import stream_export

    with stream_export.open_source(src) as source:
        if to == "forge":
            return stream_export.save_forge_streamed(source, dst)
        if to == "hf":
            from forge_dist.data.tokenizers import tokenizer_from_spec

            if tokenizer is None and source.training.get("tokenizer"):
                tokenizer = tokenizer_from_spec(source.training["tokenizer"])
            return stream_export.save_hf_streamed(source, dst, tokenizer)
        try:
            return stream_export.save_ckpt_streamed(source, dst, layout)
        except stream_export.NotStreamable:
            return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a forge-train out_dir or one of its checkpoints (checkpoints/iter_N, verified "
                               "first), a forge_dist model directory, a ReaLLM-Forge ckpt.pt or its out_dir, a "
                               "transformers directory, or a DeepSpeed save directory")
    p.add_argument("dst", help="output: a directory (forge), or a .pt file / out_dir (reallm-forge)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format (hf: a transformers directory)")
    p.add_argument("--dataset", default=None, help="--to hf: export this dataset's tokenizer with the model "
                                                    "(default: the tokenizer the checkpoint carries)")
    p.add_argument("--layout", default="snapshot", choices=reallm_forge.LAYOUTS,
                   help="ReaLLM-Forge version to write for --to reallm-forge: the reference snapshot "
                        "(42dfe7f, peri-LN out_ln_*) or latest upstream (peri_ln_*, (1,) embedding_scale)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from forge_dist.config.device import quiet_libraries

    quiet_libraries()  # a DeepSpeed source imports deepspeed
    args = build_parser().parse_args(argv)
    try:
        tokenizer = None
        if args.dataset is not None:
            from forge_dist.data.dataset import load_tokenizer, resolve_dataset

            tokenizer = load_tokenizer(resolve_dataset(args.dataset))
        written = convert(args.src, args.dst, args.to, args.layout, tokenizer)
    except (CheckpointError, ConfigError) as e:
        print(f"forge-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""forge-convert: between forge_dist's checkpoint directory, ReaLLM-Forge's ckpt.pt and transformers.

    forge-convert out/ckpt.pt converted/ --to forge           # ReaLLM-Forge -> forge_dist
    forge-convert converted/ out2/ --to reallm-forge          # -> out2/ckpt.pt (or DST.pt)
    forge-convert out/checkpoints/iter_0000100 model/ --to forge   # a DeepSpeed checkpoint (ZeRO 0-3, any TP)
    forge-convert converted/ hf/ --to hf --dataset shakespeare_char  # -> transformers (+ tokenizer)
    forge-convert hf/ back/ --to forge                        # a transformers directory (safetensors)

The source format is detected. Weights and the model configuration convert exactly; iter_num,
best_val_loss and ReaLLM-Forge's run ``config`` travel along; optimizer state does not.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.io import deepspeed_ckpt, forge_format, reallm_forge
from forge_dist.io.pretrained import load_any

TARGETS = ("forge", "reallm-forge", "hf")


def convert(src: str, dst: str, to: str, layout: str = "snapshot", tokenizer=None) -> str:
    """Convert ``src`` (any format) into ``dst`` in format ``to``; returns what was written.
    ``layout`` picks upstream's spelling for --to reallm-forge (see reallm_forge.LAYOUTS);
    ``tokenizer`` (a forge_dist Tokenizer) goes along with --to hf."""
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r} is not a checkpoint format; valid values: {', '.join(TARGETS)}")
    load = deepspeed_ckpt.load_deepspeed if deepspeed_ckpt.is_deepspeed_checkpoint(src) else load_any
    model, training = load(src)
    dst = os.fspath(dst)
    if to == "forge":
        forge_format.save_pretrained(model, dst, training=training)
        return dst
    if to == "hf":
        from forge_dist.io.hf import save_hf

        return save_hf(model, dst, tokenizer=tokenizer)
    return reallm_forge.save_ckpt(model, dst, training=training, layout=layout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="forge_dist checkpoint directory, ReaLLM-Forge ckpt.pt, or its out_dir, or a DeepSpeed "
                               "checkpoint of forge-train (its deepspeed/ folder or the checkpoint holding it)")
    p.add_argument("dst", help="output: a directory (forge), or a .pt file / out_dir (reallm-forge)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format (hf: a transformers directory)")
    p.add_argument("--dataset", default=None, help="--to hf: export this dataset's tokenizer with the model "
                                                    "(byte and char tokenizers)")
    p.add_argument("--layout", default="snapshot", choices=reallm_forge.LAYOUTS,
                   help="ReaLLM-Forge version to write for --to reallm-forge: the reference snapshot "
                        "(42dfe7f, peri-LN out_ln_*) or latest upstream (peri_ln_*, (1,) embedding_scale)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
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

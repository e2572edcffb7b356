"""``forge-sample``: text from a trained model, with a KV cache.

    forge-sample --out_dir out --start "Once upon a time" --num_samples 3 --max_new_tokens 200

``--out_dir`` takes a forge-train out_dir, a checkpoint directory, a forge_dist model directory or
a ReaLLM-Forge ckpt.pt (or its out_dir). ``--start FILE:prompt.txt`` reads the prompt from a file.
Each value of ``--top_k`` is sampled separately (ReaLLM-Forge's sample.py does the same).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

import torch

from forge_dist.config.arguments import OneLineParser, fail
from forge_dist.errors import CheckpointError, ConfigError

PROG = "forge-sample"


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() == "none" else int(text)


def build_parser() -> OneLineParser:
    from forge_dist.inference.loading import add_checkpoint_arguments

    p = OneLineParser(prog=PROG, description="Generate text from a trained model (KV-cached).", allow_abbrev=False,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_arguments(p, "take the tokenizer from this dataset instead")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file "
                   "(default: a newline)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per --top_k value")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top_k", type=_optional_int, nargs="+", default=[200], help="one run per value; none: off")
    p.add_argument("--stop_strings", nargs="*", default=[], help="end a sample at the first of these")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="autocast dtype of the forward passes")
    p.add_argument("--kv_cache", default=True, action=argparse.BooleanOptionalAction,
                   help="decode with the KV cache (same tokens, much faster)")
    return p


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read()
        except OSError as e:
            raise ConfigError(f"--start FILE:{path}: cannot read it ({e.strerror})") from None
    return start


def sample_texts(loaded, args) -> List[str]:
    from forge_dist.inference.generate import cut_at_stop, generate, stop_on_strings
    from forge_dist.inference.loading import require_tokenizer

    tok = require_tokenizer(loaded)
    prompt = tok.encode(read_prompt(args.start))
    if not prompt:
        raise ConfigError("--start encodes to no tokens; give a non-empty prompt")
    device = str(next(loaded.model.parameters()).device)
    stop = stop_on_strings(tok.decode, args.stop_strings) if args.stop_strings else None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    texts = []
    with torch.autocast(device.split(":")[0], dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32"):
        for k in args.top_k:
            for _ in range(args.num_samples):
                ids = generate(loaded.model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=k,
                               use_cache=args.kv_cache, generator=gen, stop=stop)
                texts.append(read_prompt(args.start) + cut_at_stop(tok.decode(ids), args.stop_strings))
    return texts


def main(argv: Optional[Sequence[str]] = None) -> int:
    from forge_dist.inference.loading import load_for_inference
    from forge_dist.config.device import check_device, resolve_device

    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        device = resolve_device(args.device)
        check_device(device, args.dtype)
        loaded = load_for_inference(args.out_dir, args.ckpt, args.dataset, device)
        texts = sample_texts(loaded, args)
    except (ConfigError, CheckpointError) as e:
        fail(str(e), PROG)
    for text in texts:
        print(text)
        print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main())

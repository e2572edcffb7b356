"""``forge-eval``: validation loss and perplexity (exp of the mean cross-entropy) of a checkpoint.

    forge-eval --out_dir out                 # the dataset the run trained on, its val split
    forge-eval --out_dir ckpt.pt --dataset data/shakespeare_char --eval_iters 100

It draws the same evaluation batches as forge-train (the loader's eval stream, round 0), so with
the run's seed and batch size it reproduces the val loss the run logged for that checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch

from forge_dist.config.arguments import OneLineParser, fail
from forge_dist.errors import CheckpointError, ConfigError

PROG = "forge-eval"


def mean_loss(loss_fn: Callable, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean of ``loss_fn(x, y)`` over the batches, accumulated in float64."""
    total, n = 0.0, 0
    for x, y in batches:
        total += float(loss_fn(x, y).double())
        n += 1
    return total / max(n, 1)


def eval_batches(loader, split: str, eval_iters: int):
    return (loader.get_eval(split, 0, k) for k in range(eval_iters))


def build_parser() -> OneLineParser:
    from forge_dist.inference.loading import add_checkpoint_arguments

    p = OneLineParser(prog=PROG, description="Validation loss and perplexity of a checkpoint.", allow_abbrev=False,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_arguments(p, "dataset to evaluate on (default: the run's own)")
    p.add_argument("--split", default="val", help="dataset split to evaluate")
    p.add_argument("--eval_iters", type=int, default=200, help="batches to average over")
    p.add_argument("--batch_size", type=int, default=None, help="default: the run's batch_size, else 16")
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed, else 1337")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="autocast dtype of the forward passes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    return p


def evaluate(loaded, args) -> dict:
    from forge_dist.data.dataset import read_meta
    from forge_dist.data.loader import BatchLoader
    from forge_dist.io import checkpoint_read as ckpt

    if loaded.data_dir is None:
        raise ConfigError(f"no dataset known for {loaded.source}; pass --dataset NAME_OR_PATH "
                          f"('default' is the bundled corpus)")
    run_cfg = ckpt.read_config(loaded.source) if ckpt.is_checkpoint(loaded.source) else {}
    model = loaded.model
    vocab = read_meta(loaded.data_dir).vocab_size
    if vocab > model.config.vocab_size:
        raise ConfigError(f"vocab mismatch: dataset {loaded.data_dir} has {vocab} token ids, the model "
                          f"{model.config.vocab_size}; evaluate on a dataset prepared with the model's tokenizer")
    batch = args.batch_size or run_cfg.get("batch_size", 16)
    seed = args.seed if args.seed is not None else run_cfg.get("seed", 1337)
    loader = BatchLoader.from_dir(loaded.data_dir, model.config.block_size, batch, seed=seed)
    if args.split not in loader.splits:
        raise ConfigError(f"dataset {loaded.data_dir} has no {args.split!r} split (it has: {', '.join(loader.splits)})")
    device = next(model.parameters()).device
    amp = (torch.autocast(device.type, dtype=getattr(torch, args.dtype)) if args.dtype != "float32"
           else contextlib.nullcontext())

    @torch.no_grad()
    def loss_fn(x, y):
        with amp:
            return model(x.to(device), y.to(device))[1].float()

    loss = mean_loss(loss_fn, eval_batches(loader, args.split, args.eval_iters))
    return {"checkpoint": loaded.source, "dataset": loaded.data_dir, "split": args.split, "loss": loss,
            "perplexity": math.exp(loss), "batches": args.eval_iters, "batch_size": batch,
            "block_size": model.config.block_size}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from forge_dist.inference.loading import load_for_inference
    from forge_dist.config.device import check_device, resolve_device

    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        if args.eval_iters < 1:
            raise ConfigError(f"--eval_iters {args.eval_iters} must be at least 1")
        device = resolve_device(args.device)
        check_device(device, args.dtype)
        result = evaluate(load_for_inference(args.out_dir, args.ckpt, args.dataset, device), args)
    except (ConfigError, CheckpointError) as e:
        fail(str(e), PROG)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['split']} loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} "
              f"({result['batches']} batches of {result['batch_size']} x {result['block_size']} tokens; "
              f"{result['checkpoint']} on {result['dataset']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``forge-train`` (also ``python -m forge_dist.train``).

Options are generated from the option dataclasses in OPTION_GROUPS (one line per family). A user
error (unknown option, wrong type, missing dataset, vocabulary mismatch, bad checkpoint) exits
with status 2 and one line saying what is wrong and what to do, before training starts.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from forge_dist.config.model_config import ModelConfig
from forge_dist.config.validate import CHOICES as MODEL_CHOICES, REGISTRY_OPTIONS
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.train.arguments import OptionGroup, parse_options
from forge_dist.train.options import CHOICES as TRAIN_CHOICES, TrainConfig

PROG = "forge-train"
DESCRIPTION = """\
Train a GPT of the ReaLLM-Forge family (flat option names as in ReaLLM-Forge's train.py).

With no options it trains the embedded tiny preset on the bundled corpus (about a minute on a
2-core CPU). The defaults shown are the embedded preset's; --config FILE replaces the preset, and
options given on the command line override the file. --init_from resume continues the run in
--out_dir with its saved options, overridden only by the options given."""

MODEL_HELP = {
    "vocab_size": "taken from the dataset unless given (a larger value pads the token table).",
    "use_gradient_checkpointing": "recompute each block in the backward pass (less memory, more time).",
}
TRAIN_HELP = {
    "out_dir": "where config.yaml, metrics.jsonl, loss.png, tensorboard/ and checkpoints/ go.",
    "dataset": "a prepared folder, a name under ./data/, or 'default' (the bundled corpus).",
    "init_from": "scratch; resume (the latest checkpoint in out_dir); prev_run (weights of --prev_run_ckpt).",
    "batch_size": "sequences per micro-batch per data-parallel rank.",
    "lr_scheduler": "none is constant; the others warm up linearly for warmup_iters.",
    "patience": "stop after this many evaluations in a row without a better val loss.",
    "grad_clip": "clip the global gradient norm to this (0: off).",
    "dtype": "auto: bfloat16 on a GPU that has it, else float32. float16 needs a GPU.",
    "peak_flops": "device peak FLOP/s used for MFU when the device is not in the built-in table.",
    "max_sample_tokens": "length of the sample printed at the end (none: no sample).",
}


def _model_choices() -> dict:
    import forge_dist.model  # noqa: F401  (registers every variant)
    from forge_dist.model import registries

    out = {name: getattr(registries, reg).names() for name, reg in REGISTRY_OPTIONS.items()}
    out.update(MODEL_CHOICES)
    return {k: v for k, v in out.items() if v}


def option_groups() -> List[OptionGroup]:
    """The option families of forge-train; a new family is one more entry here."""
    return [
        OptionGroup("model", ModelConfig, help=MODEL_HELP, choices=_model_choices()),
        OptionGroup("training", TrainConfig, help=TRAIN_HELP, choices=TRAIN_CHOICES),
    ]


def fail(message: str, prog: str = PROG) -> None:
    """Exit 2 with one line (user errors never show a traceback)."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from forge_dist.presets import read_preset
    from forge_dist.train.build import build_run
    from forge_dist.train.trainer import Trainer, summary

    argv = sys.argv[1:] if argv is None else list(argv)
    groups = option_groups()
    try:
        parsed = parse_options(argv, PROG, groups, read_preset(), DESCRIPTION)
        run = build_run(parsed, groups)
    except (ConfigError, CheckpointError) as e:
        fail(str(e))
    try:
        result = Trainer(run).fit()
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; resume with: {PROG} --out_dir {run.train_cfg.out_dir} --init_from resume",
              file=sys.stderr)
        return 130
    if run.ctx.is_main:
        print(summary(result, run), flush=True)
    return 1 if result.stop_reason == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())

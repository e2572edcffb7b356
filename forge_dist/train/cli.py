"""``forge-train`` (also ``python -m forge_dist.train``).

Options are generated from the option dataclasses in OPTION_GROUPS (one line per family). A user
error (unknown option, wrong type, missing dataset, vocabulary mismatch, bad checkpoint) exits
with status 2 and one line saying what is wrong and what to do, before training starts.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional, Sequence

from forge_dist.config import arguments
from forge_dist.config.arguments import OptionGroup, parse_options
from forge_dist.config.device import quiet_libraries
from forge_dist.config.model_config import ModelConfig
from forge_dist.config.parallel import BACKENDS, ParallelConfig
from forge_dist.config.validate import CHOICES as MODEL_CHOICES, REGISTRY_OPTIONS
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.parallel.pipeline.split import SCHEDULES
from forge_dist.train.options import CHOICES as TRAIN_CHOICES, EngineOptions, TrainConfig
from forge_dist.train.bad_steps import BAD_STEP_HELP, MODES as BAD_STEP_MODES, BadStepOptions
from forge_dist.train.reliability import DIAGNOSTICS_HELP, DiagnosticsOptions, diagnostics_options

PROG = "forge-train"
DESCRIPTION = """\
Train a GPT of the ReaLLM-Forge family (flat option names as in ReaLLM-Forge's train.py).

With no options it trains the embedded tiny preset on the bundled corpus (about a minute on a
2-core CPU). The defaults shown are the embedded preset's; --config FILE replaces the preset, and
options given on the command line override the file. --init_from resume continues the run in
--out_dir with its saved options, overridden only by the options given (the parallel and engine
options are always this launch's own).

In parallel: torchrun --nproc_per_node 2 -m forge_dist.train --tensor_parallel_size 2 ...
(or mpirun -np 2 forge-train ..., srun, the deepspeed launcher); processes beyond
tensor_parallel_size are data-parallel replicas, each taking its slice of the global batch."""

MODEL_HELP = {
    "vocab_size": "taken from the dataset unless given (a larger value pads the token table).",
    "use_gradient_checkpointing": "recompute each block in the backward pass (less memory, more time).",
}
TRAIN_HELP = {
    "out_dir": "where config.yaml, metrics.jsonl, loss.png, tensorboard/ and checkpoints/ go.",
    "dataset": "a prepared folder, a name under ./data/, or 'default' (the bundled corpus).",
    "dataset_list": "several prepared datasets (one tokenizer) trained together, one drawn per iteration "
                    "from (seed, iteration); replaces --dataset; with use_lsv the LSV index is the position.",
    "dataset_sampling_probs": "one weight per --dataset_list entry (normalised); none: uniform.",
    "init_from": "scratch; resume (the latest checkpoint in out_dir); prev_run (weights of --prev_run_ckpt).",
    "batch_size": "sequences per micro-batch per data-parallel rank.",
    "lr_scheduler": "none is constant; the others warm up linearly for warmup_iters.",
    "patience": "stop after this many evaluations in a row without a better val loss.",
    "grad_clip": "clip the global gradient norm to this (0: off).",
    "dtype": "auto: bfloat16 on a GPU that has it, else float32. float16 needs a GPU.",
    "peak_flops": "device peak FLOP/s used for MFU when the device is not in the built-in table.",
    "max_sample_tokens": "length of the sample printed at the end (none: no sample).",
}


PARALLEL_HELP = {
    "tensor_parallel_size": "processes that split every layer (Megatron tensor parallelism); the launched "
                            "world must be a multiple of it, the remaining factor is data parallelism.",
    "pipeline_parallel_size": "pipeline stages: layers split over this many process groups (outermost "
                              "in the rank order); gradient_accumulation_steps is the micro-batch count.",
    "pipeline_schedule": "torch.distributed.pipelining schedule (docs/parallel.md says when to pick each).",
    "virtual_pipeline_size": "model chunks per rank (interleaved schedules; zbv and dualpipev use 2); "
                             "none: the schedule's default.",
    "pipeline_layers": "layers per stage (per chunk with virtual_pipeline_size > 1), e.g. 3,4,4,3; "
                       "none: a split balancing parameters, embedding and head counted.",
    "expert_parallel_size": "split each MoE layer's experts over this many data-parallel replicas (tokens "
                            "dispatched by all-to-all); must divide n_experts and the data-parallel size.",
    "expert_tensor_parallel_size": "none: experts split over the tensor-parallel ranks like the MLP; 1: each "
                                   "expert whole on every tensor-parallel rank, the ranks splitting each MoE "
                                   "layer's tokens (Megatron-Core's choice).",
    "sequence_parallel": "split the residual stream along the sequence over the tensor-parallel ranks "
                         "(block_size must be divisible by tensor_parallel_size).",
    "make_vocab_size_divisible_by": "pad the vocabulary to a multiple of this x tensor_parallel_size "
                                    "(padded ids are never predicted).",
    "dist_timeout_minutes": "collective timeout: a lost rank fails the run instead of hanging it.",
    "dist_backend": "none: nccl on GPUs, gloo on CPU.",
}
ENGINE_HELP = {
    "deepspeed_config": "train with the DeepSpeed engine and this JSON config (docs/deepspeed.md).",
    "zero_stage": "native engine: 1 shards the AdamW state over the data-parallel replicas (ZeRO-1, "
                  "torch's ZeroRedundancyOptimizer; with pipeline stages, over each stage's replicas; an "
                  "expert's over the replicas holding it); "
                  "ZeRO-2/3: --deepspeed_config.",
    "preflight": "check every rank and every process group first (forge-preflight); stop with exit 1 "
                 "naming the ranks that disagree or fail.",
}


def _model_choices() -> dict:
    from forge_dist import variants as registries

    out = {name: getattr(registries, reg).names() for name, reg in REGISTRY_OPTIONS.items()}
    out.update(MODEL_CHOICES)
    return {k: v for k, v in out.items() if v}


def option_groups() -> List[OptionGroup]:
    """The option families of forge-train; a new family is one more entry here."""
    return [
        OptionGroup("model", ModelConfig, help=MODEL_HELP, choices=_model_choices()),
        OptionGroup("training", TrainConfig, help=TRAIN_HELP, choices=TRAIN_CHOICES),
        OptionGroup("parallel", ParallelConfig, help=PARALLEL_HELP,
                    choices={"dist_backend": BACKENDS, "pipeline_schedule": tuple(SCHEDULES)},
                    resumable=False),
        OptionGroup("engine", EngineOptions, help=ENGINE_HELP, resumable=False),
        OptionGroup("diagnostics", DiagnosticsOptions, help=DIAGNOSTICS_HELP, resumable=False),
        OptionGroup("bad steps", BadStepOptions, help=BAD_STEP_HELP, choices={"on_bad_step": BAD_STEP_MODES}),
    ]


def fail(message: str, prog: str = PROG, quiet: bool = False) -> None:
    """config.arguments.fail with forge-train's name: one line, exit 2."""
    arguments.fail(message, prog, quiet)


LAUNCHER_ARGS = ("--local_rank", "--local-rank")  # added by the deepspeed launcher (torch.distributed.launch too)


def strip_launcher_args(argv: Sequence[str]) -> List[str]:
    """argv without ``--local_rank N`` / ``--local_rank=N``: launchers append it, and the rank
    is read from the environment they also set (LOCAL_RANK)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCHER_ARGS:
            skip = "=" not in arg and i + 1 < len(argv) and argv[i + 1].isdigit()
            continue
        out.append(arg)
    return out


def refuse(message: str, quiet: bool) -> None:
    """A refusal every rank of a launch reaches alike: rank 0 prints the line and exits 2.

    Under torchrun the other ranks exit 0: a rank that fails first makes torchrun stop rank 0,
    often before it speaks, and report that rank. Rank 0 also writes torchrun's error file, so
    torchrun's closing report repeats the line as its ``traceback`` (the last lines printed)."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if quiet and under_torchrun:
        raise SystemExit(0)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not quiet and under_torchrun and error_file:
        line = f"{PROG}: error: {' '.join(message.split())}"
        try:
            with open(error_file, "w", encoding="utf-8") as fh:
                # torchelastic's ErrorHandler format; its report prints py_callstack as the traceback
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, fh)
        except OSError:
            pass  # the line below still says it
    fail(message, quiet=quiet)


def plan(argv: Sequence[str], prog: str = PROG):
    """Parse, resolve and validate a launch; bad input exits 2 with one line, before any process
    group. Returns (parsed options, option groups, Resolved, Launch)."""
    from forge_dist.presets import read_preset
    from forge_dist.train.resolve import check_data, resolve_run
    from forge_dist.train.launch import detect_env, plan_launch
    from forge_dist.train.recovery import verify_data
    from forge_dist.train.sharded_save import check_checkpoint_options

    quiet_libraries()
    argv = strip_launcher_args(argv)
    groups = option_groups()
    quiet = False
    try:
        env = detect_env()
        quiet = env.rank != 0  # every rank reaches the same verdict on the same input; rank 0 says it
        parsed = parse_options(argv, prog, groups, read_preset(), DESCRIPTION)
        resolved = resolve_run(parsed, groups)
        launch = plan_launch(resolved.values, resolved.model_cfg, resolved.train_cfg, env=env)
        check_data(resolved, launch.dp_size)
        check_checkpoint_options(resolved.values)
        diagnostics_options(resolved.values)
        BadStepOptions.from_values(resolved.values)
        resolved.notes += verify_data(resolved.data_dirs or [resolved.data_dir])
    except (ConfigError, CheckpointError) as e:
        refuse(str(e), quiet)
    return parsed, groups, resolved, launch


def run_launched(argv: Sequence[str], prog: str, body) -> int:
    """``body(ctx, resolved, launch)`` inside the launch that forge-train's options describe (what
    forge-preflight runs instead of training); returns its exit status."""
    _, _, resolved, launch = plan(list(argv), prog)
    with launch.start() as ctx:
        return body(ctx, resolved, launch)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """One process, or one rank of a launch (torchrun, deepspeed, mpirun, srun): everything that can
    be refused is refused before any process group exists, by rank 0 with one line (exit 2)."""
    from forge_dist.train.build import build_run
    from forge_dist.parallel.flight import CollectiveMismatch
    from forge_dist.train.diagnostics import EXIT_LOST_RANK, CollectiveFailure
    from forge_dist.train.recovery import fall_back_past
    from forge_dist.train.rollback import rollback_options, train
    from forge_dist.train.sharded_save import CorruptShards
    from forge_dist.train.trainer import summary

    parsed, groups, resolved, launch = plan(sys.argv[1:] if argv is None else list(argv))
    quiet = launch.env.rank != 0
    try:
        with launch.start() as ctx:
            if resolved.values.get("preflight"):
                from forge_dist.dist.preflight import run_preflight

                if run_preflight(ctx, resolved.values, resolved.train_cfg.out_dir, bandwidth_mb=1.0,
                                 local_rank=launch.env.local_rank):
                    fail("preflight failed (above); not training", quiet=quiet)

            def build(options):  # the first run, then the rebuilds of a rollback (bad_steps.py)
                try:
                    try:
                        return build_run(options, groups, ctx, launch.engine_factory,
                                         resolved if options is parsed else None)
                    except CorruptShards as e:  # found by the ranks that read it; all fall back together
                        if options is not parsed or parsed.explicit.get("init_from_ckpt"):
                            raise
                        notes: list = []
                        previous = fall_back_past(e.path, resolved.train_cfg.out_dir, str(e), notes)
                        run = build_run(rollback_options(parsed, previous), groups, ctx, launch.engine_factory)
                        run.notes[:0] = notes
                        return run
                except (ConfigError, CheckpointError) as e:
                    fail(f"rank {ctx.rank}: {e}" if ctx.distributed else str(e))

            result, run = train(build, parsed, ctx, write=lambda line: print(line, file=sys.stderr))
            text = summary(result, run) if ctx.is_main else None
            del run  # the model and engine go before the process groups do (Launch.start)
    except CheckpointError as e:  # during training: a save that failed (train/recovery.py)
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    except (CollectiveFailure, CollectiveMismatch) as e:
        # a lost or diverged rank: the process group cannot be torn down cleanly, so leave now
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_LOST_RANK)
    except KeyboardInterrupt:
        if not quiet:
            print(f"\n{PROG}: interrupted; resume with: {arguments.runnable(PROG)} --out_dir "
                  f"{resolved.train_cfg.out_dir} --init_from resume", file=sys.stderr)
        return 130
    if text is not None:
        print(text, flush=True)
    return 1 if result.stop_reason in ("nan", "spike") else 0


if __name__ == "__main__":
    sys.exit(main())

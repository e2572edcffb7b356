"""The training loop: evaluate, step, log, checkpoint, stop.

Per iteration ``it`` (0-based; ``it`` steps are done when it starts), as ReaLLM-Forge orders it:

  1. evaluate when it % eval_interval == 0 or it == max_iters (not again at the iteration a resumed
     run starts from: that evaluation is in the checkpoint); save a checkpoint when the validation
     loss improved or --always_save_checkpoint (never at iteration 0); stop on --patience
  2. stop at max_iters
  3. the model's per-step settings (ModelFeatures.begin_step: the quantization schedule's
     iteration, the LSV index of the dataset drawn for ``it``), then
     engine.forward_backward(this rank's micro-batches of ``it``); a bad step (NaN/inf loss or
     gradient, a loss spike) on any rank is handled by every rank here, before the update, as
     --on_bad_step says (train/bad_steps.py: skip, rollback to the last checkpoint, or stop)
  4. engine.step(lr(it)); log every log_interval iterations (``loss`` is the cross-entropy; MoE
     runs add ``aux_loss``, the auxiliary losses that were backpropagated with it)
  5. a preemption signal (SIGTERM, SIGUSR1) on any rank stops every rank here, after the step
     (train/preemption.py): the checkpoint of ``it + 1`` is written and the run ends normally

Everything that must be identical on all ranks (the stop decisions) goes through the RunContext;
files and output are rank 0's. A final checkpoint is written at the end unless the run hit NaN.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional

import torch

from forge_dist.config.arguments import dump_options
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.bad_steps import BadStepOptions, BadSteps
from forge_dist.train.build import Run
from forge_dist.train.features import ModelFeatures, StepParts
from forge_dist.train.metrics import MFU, TENSORBOARD_DIR, MetricsLog, read_metrics, rewind_metrics
from forge_dist.train.plots import plot_losses
from forge_dist.train.diagnostics import CollectiveFailure, Diagnostics, straggler_fields
from forge_dist.train.preemption import Preemption
from forge_dist.train.recovery import clear_leftovers, save_failed
from forge_dist.train.reliability import diagnostics_options
from forge_dist.train.progress import Progress
from forge_dist.train.schedule import LRSchedule
from forge_dist.train.run_result import (  # noqa: F401  (summary, TrainResult: re-exported for cli, tests)
    CONFIG_FILE, NAN_FILE, PLOT_FILE, TrainResult, summary,
)


class Trainer:
    def __init__(self, run: Run, bad_steps: Optional[BadSteps] = None):
        self.run, self.cfg, self.ctx, self.engine = run, run.train_cfg, run.ctx, run.engine
        self.schedule = LRSchedule.from_config(self.cfg)
        self.out_dir = self.cfg.out_dir
        self.root = os.path.join(self.out_dir, ckpt.ROOT)
        self.mfu = MFU(run.model, self.cfg.resolved_device, self.cfg.resolved_dtype, self.cfg.peak_flops,
                       flops=run.flops_per_token)
        self.tokens_per_iter = run.loader.global_batch_size * run.model_cfg.block_size
        self.best_val_loss, self.best_iter = run.best_val_loss, run.best_iter
        self.evals_since_best = run.evals_since_best
        self.last_checkpoint: Optional[str] = run.resumed_from
        self.saved_at = run.start_iter if run.resumed_from else None
        self.features = ModelFeatures(run.model)
        self.multi = hasattr(run.loader, "dataset_index")  # --dataset_list: a MultiDatasetLoader
        self.evaluated_at: Optional[int] = None
        self.preemption = Preemption()
        self.bad_steps = bad_steps or BadSteps(BadStepOptions.from_values(run.values), self.out_dir, self.ctx.is_main)
        self.bad_steps.load_state_dict((run.resumed_state or {}).get("bad_steps"))
        opts = diagnostics_options(run.values)
        self.diagnostics = Diagnostics(self.ctx, self.out_dir, opts.collective_timeout_s, opts.debug_collectives)
        self.compute_s = 0.0  # this rank's last step, outside collectives (the straggler metrics)
        from forge_dist.train.sharded_save import checkpointer_for

        self.checkpointer = checkpointer_for(self.cfg, self.ctx, self.engine)  # None: the gathered format

    # --- pieces -------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        """A resumed run continues the out_dir's logs; a new one sets the old run's files aside."""
        if self.ctx.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            if self.run.resumed_from is not None:
                rewind_metrics(self.out_dir, self.run.start_iter)
                self.run.notes += clear_leftovers(self.root)  # what a crashed save left
            else:
                if os.path.isdir(self.root):
                    prev = self.root + ".prev"
                    shutil.rmtree(prev, ignore_errors=True)
                    os.rename(self.root, prev)
                    self.run.notes.append(f"moved the previous run's checkpoints to {prev}")
                shutil.rmtree(os.path.join(self.out_dir, TENSORBOARD_DIR), ignore_errors=True)
            if os.path.exists(os.path.join(self.out_dir, NAN_FILE)):
                os.remove(os.path.join(self.out_dir, NAN_FILE))
            with open(os.path.join(self.out_dir, CONFIG_FILE), "w", encoding="utf-8") as fh:
                fh.write(dump_options(self.run.values))
        self.ctx.barrier()

    def _eval_due(self, it: int) -> bool:
        if self.run.resumed_from is not None and it == self.run.start_iter:
            # that evaluation is in the checkpoint, unless a preemption saved it before evaluating
            return not (self.run.resumed_state or {}).get("eval_done", True)
        return it % self.cfg.eval_interval == 0 or it == self.cfg.max_iters

    def _split_losses(self, loader) -> dict:
        from forge_dist.inference.evaluate import eval_batches, mean_loss

        return {split: self.ctx.mean(mean_loss(self.engine.eval_loss, eval_batches(loader, split, self.cfg.eval_iters)))
                for split in ("train", "val")}

    def estimate_loss(self) -> dict:
        """Mean cross-entropy (eval mode: no auxiliary losses) over eval_iters fixed batches of each
        split (the same batches every time). With --dataset_list each dataset is evaluated with its
        own LSV entry, under ``datasets``; ``train``/``val`` are then the means weighted by the
        sampling probabilities (the loss of the training mixture)."""
        self.engine.eval()
        if not self.multi:
            out = self._split_losses(self.run.loader)
        else:
            loader, out = self.run.loader, {"datasets": {}}
            for i, (name, sub) in enumerate(zip(loader.names, loader.loaders)):
                self.features.select_dataset(i)
                out["datasets"][name] = self._split_losses(sub)
            for split in ("train", "val"):
                out[split] = float(sum(p * d[split] for p, d in zip(loader.probs, out["datasets"].values())))
        self.engine.train()
        return out

    def _trainer_state(self, it: int) -> dict:
        return {"iteration": it, "best_val_loss": self.best_val_loss, "best_iter": self.best_iter,
                "evals_since_best": self.evals_since_best, "loader": self.run.loader.state_dict(),
                "schedule": self.schedule.state_dict(), "rng": ckpt.rng_state(), "config": self.run.values,
                "tokenizer": self.run.tokenizer.spec(), "data_dir": os.path.abspath(self.run.data_dir),
                "data_dirs": [os.path.abspath(d) for d in self.run.data_dirs],
                # every rank's streams (a collective), so a resume at the same layout replays every
                # rank's dropout masks; the layout says when it is the same
                "rng_ranks": self.ctx.gather_object(ckpt.rng_state()), "layout": self.ctx.layout(),
                "engine": getattr(self.engine, "name", type(self.engine).__name__),
                "bad_steps": self.bad_steps.state_dict(),
                # False only when a preemption saved before the evaluation that was due at ``it``
                "eval_done": self.evaluated_at == it or not (it % self.cfg.eval_interval == 0
                                                             or it == self.cfg.max_iters)}

    def save(self, it: int, is_best: bool) -> None:
        if self.cfg.never_save_checkpoint or self.saved_at == it:
            return
        try:
            if self.checkpointer is not None:
                self.wait_for_checkpoint()  # the async save in flight (its errors are its own)
                self.last_checkpoint = self.checkpointer.save(self.root, it, self.run.model, self.engine,
                                                              self._trainer_state(it), keep=self.cfg.keep_checkpoints,
                                                              is_best=is_best)
            else:
                self.last_checkpoint = ckpt.save_checkpoint(self.root, it, self.run.model, self.engine,
                                                            self._trainer_state(it), self.ctx,
                                                            keep=self.cfg.keep_checkpoints, is_best=is_best)
        except OSError as e:  # e.g. the disk filled up: stop with one line, the older checkpoints intact
            raise save_failed(e, self.root, it, self.last_checkpoint) from None
        self.saved_at = it

    def wait_for_checkpoint(self) -> None:
        """Collective: an async checkpoint in flight is published (--async_checkpoint)."""
        if self.checkpointer is None or self.checkpointer.pending_iteration is None:
            return
        it = self.checkpointer.pending_iteration
        try:
            self.checkpointer.wait()
        except OSError as e:
            raise save_failed(e, self.root, it, None) from None

    def _evaluate(self, it: int, progress: Progress) -> dict:
        losses = self.estimate_loss()
        self.evaluated_at = it
        improved = losses["val"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_iter, self.evals_since_best = losses["val"], it, 0
        else:
            self.evals_since_best += 1
        per = losses.get("datasets", {})
        detail = "".join(f", {name} {d['val']:.4f}" for name, d in per.items())
        progress.write(f"eval at iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                       + (f" (per dataset{detail})" if per else "") + (" (best so far)" if improved else ""))
        if (improved or self.cfg.always_save_checkpoint) and it > 0:
            self.save(it, is_best=improved)
        record = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}
        for name, d in per.items():
            record[f"train_loss/{name}"], record[f"val_loss/{name}"] = d["train"], d["val"]
        return record

    # --- the loop -----------------------------------------------------------------------------
    def _step(self, it: int):
        """One optimizer step; (loss, stats, parts, dataset), or why the step is bad on some rank (no
        update made). ``loss`` is what the engine backpropagated (cross-entropy + MoE auxiliary losses)."""
        start, recorder = time.perf_counter(), self.ctx.recorder
        if recorder is not None:
            recorder.take_comm_seconds()
        dataset = self.run.loader.dataset_index(it) if self.multi else None
        self.features.begin_step(it, dataset)
        micro_batches = [self.run.loader.get(it, m) for m in range(self.cfg.gradient_accumulation_steps)]
        try:
            loss = self.engine.forward_backward(micro_batches)
        finally:
            parts = self.features.end_step()
        reason = self.bad_steps.check(loss, self.engine, self.ctx)
        if reason is not None:
            return reason
        self.bad_steps.good()
        stats = self.engine.step(self.schedule(it))
        self.compute_s = time.perf_counter() - start - (recorder.take_comm_seconds() if recorder is not None else 0.0)
        return loss, stats, parts, dataset

    def _record(self, it: int, loss, stats: dict, parts: StepParts, dataset: Optional[int],
                tokens_per_s: float) -> dict:
        ce = parts.ce if parts.ce is not None else loss  # an engine whose forward the hook missed
        record = {"iter": it, "loss": self.ctx.mean(ce.item()), "lr": self.schedule(it),
                  "tokens_per_s": tokens_per_s, "mfu": self.mfu(tokens_per_s / self.ctx.world_size)}
        for key, value in stats.items():  # grad_norm; loss_scale and skipped_steps with float16
            if value is not None:
                record[key] = int(value) if key == "skipped_steps" else float(value)
        if self.features.use_moe:
            record["aux_loss"] = self.ctx.mean(parts.aux.item() if parts.aux is not None else 0.0)
            record.update(self.features.moe_record(parts, self.ctx))
        levels = self.features.quant_levels()
        if levels:
            record["quant_level"] = levels
        if self.ctx.distributed:
            record.update(straggler_fields(self.ctx, self.compute_s))
        if dataset is not None:
            record["dataset"] = dataset
        if parts.lsv_index is not None:
            record["lsv_index"] = parts.lsv_index
        return record

    def fit(self) -> TrainResult:
        """Train; a collective that fails (a lost rank) raises CollectiveFailure naming the rank."""
        with self.diagnostics:
            try:
                return self._fit()
            except Exception as e:
                if self.diagnostics.failed(e):  # a recorded collective, or DeepSpeed's own
                    raise CollectiveFailure(self.diagnostics.report_failure(e)) from e
                raise

    def _fit(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        start_time = time.time()
        self._prepare_out_dir()
        metrics = MetricsLog(self.out_dir, ctx.is_main, cfg.tensorboard_log, append=self.run.resumed_from is not None)
        progress = Progress(cfg.max_iters, self.run.start_iter, ctx.is_main, cfg.progress and sys.stderr.isatty())
        for note in self.run.notes + ([self.mfu.reason] if self.mfu.reason else []):
            progress.write(note)
        it, stop, nan_iter, pending, record = self.run.start_iter, "max_iters", None, None, None
        window = (time.time(), it)  # tokens/s is measured between logged steps, evaluations excluded
        self.engine.train()
        self.preemption.install()
        try:
            while True:
                self.diagnostics.at_step(it)
                if self._eval_due(it):
                    pending = self._evaluate(it, progress)
                    window = (time.time(), it)
                    if cfg.patience is not None and ctx.any(self.evals_since_best > cfg.patience):
                        stop = "patience"
                        break
                if it >= cfg.max_iters:
                    break
                if it in self.bad_steps.skip_iters:  # a batch a rollback dropped
                    self.bad_steps.log(it, "dropped by a rollback", "skipped", progress.write, metrics)
                    it += 1
                    continue
                stepped = self._step(it)
                if isinstance(stepped, str):  # a bad step: skip, rollback or stop
                    action = self.bad_steps.decide(it, stepped, self.engine, progress.write, metrics,
                                                   self.last_checkpoint)
                    if action != "skip":
                        stop, nan_iter = ("rollback" if action == "rollback" else self.bad_steps.stop_reason()), it
                        break
                    if pending is not None:
                        metrics.log(pending)
                        pending = None
                    it += 1
                    continue
                logged = it % cfg.log_interval == 0 or it + 1 == cfg.max_iters
                if logged:
                    now = time.time()
                    tokens_per_s = self.tokens_per_iter * (it + 1 - window[1]) / max(now - window[0], 1e-9)
                    record = self._record(it, *stepped, tokens_per_s)
                    if pending is not None:  # the evaluation before this step joins its record
                        record.update({k: v for k, v in pending.items() if k != "iter"})
                        pending = None
                    metrics.log(record)
                    window = (now, it + 1)
                if pending is not None:
                    metrics.log(pending)
                    pending = None
                it += 1
                if record is not None:
                    progress.step(it, record, logged)
                if it < cfg.max_iters and self.preemption.agreed(ctx):
                    stop = "preempted"
                    break
            if pending is not None:
                metrics.log(pending)
        finally:
            self.preemption.close()
            progress.close()
            self.features.close()
        if stop == "nan":
            self._record_nan(nan_iter, metrics)
        elif stop not in ("spike", "rollback"):
            self.save(it, is_best=self.best_iter == it)
            self._save_obtained_vector(progress)
        self.wait_for_checkpoint()
        if self.checkpointer is not None:
            self.checkpointer.close()
        metrics.close()
        result = TrainResult(self.out_dir, it, stop, self.best_val_loss, self.last_checkpoint, 0.0, nan_iter,
                             stopped_by=self.preemption.signal_name, bad_step=self.bad_steps.last_reason)
        if ctx.is_main and stop != "rollback":
            plot_losses(read_metrics(self.out_dir), os.path.join(self.out_dir, PLOT_FILE))
        if stop in ("max_iters", "patience"):  # a preempted run has seconds left: no sample
            sample = self.sample()  # every rank calls: the engine decides who runs the forward
            if ctx.is_main:
                result.sample = sample
        ctx.barrier()
        result.wall_s = time.time() - start_time
        return result

    def _save_obtained_vector(self, progress: Progress) -> None:
        """--obtain_vector_file: the mean output of block obtain_vector_at_layer_idx over rank 0's
        forward passes of this run (training and evaluation), written by rank 0."""
        cfg = self.run.model_cfg
        if not self.ctx.is_main or cfg.obtain_vector_at_layer_idx is None or not cfg.obtain_vector_file:
            return
        from forge_dist.errors import ConfigError

        try:
            path = self.run.model.steering.save_obtained()
        except ConfigError as e:  # e.g. nothing captured (max_iters 0 without an evaluation)
            progress.write(f"no steering vector written: {e}")
            return
        progress.write(f"wrote the steering vector obtained after block {cfg.obtain_vector_at_layer_idx} to {path}")

    def _record_nan(self, it: int, metrics: MetricsLog) -> None:
        metrics.log({"iter": it, "nan_stop": True})
        if self.ctx.is_main:
            with open(os.path.join(self.out_dir, NAN_FILE), "w", encoding="utf-8") as fh:
                fh.write(f"{it}\n")

    def _sampling_model(self):
        """The model this rank samples with, or None when it takes no part. An engine whose model
        cannot run a forward on rank 0 alone says how: ``generation_model()`` with
        ``forward_is_collective`` (tensor parallelism: every rank runs the forward), or
        ``export_model(ctx)`` (a collective that returns a plain model on rank 0, e.g. ZeRO-3)."""
        if hasattr(self.engine, "generation_model"):
            collective = getattr(self.engine, "forward_is_collective", False)
            return self.engine.generation_model() if collective or self.ctx.is_main else None
        if hasattr(self.engine, "export_model"):
            model = self.engine.export_model(self.ctx)
            return None if model is None else model.to(self.cfg.resolved_device)
        return self.run.model if self.ctx.is_main else None

    def sample(self) -> Optional[str]:
        """A short sample from the trained model on rank 0 (None elsewhere, or when disabled or not
        encodable). Called by every rank; under tensor parallelism every rank runs the forward and
        draws the same tokens (the generator is seeded alike, the logits are gathered in full)."""
        from forge_dist.errors import ConfigError
        from forge_dist.inference.generate import generate

        n = self.cfg.max_sample_tokens
        if not n:
            return None
        try:
            prompt = self.run.tokenizer.encode(self.cfg.sample_start_tokens)
        except ConfigError as e:  # e.g. an external tokenizer we cannot run (the same on every rank)
            self.run.notes.append(f"no sample: {e}")
            return None
        model = self._sampling_model()
        if model is None:
            return None
        if self.features.lsv is not None:  # the dataset the model was configured with (lsv_index)
            self.features.select_dataset(self.run.model_cfg.lsv_index or 0)
        device = self.cfg.resolved_device
        gen = torch.Generator(device=device).manual_seed(self.cfg.seed)
        ids = generate(model, prompt or [0], n, temperature=0.8, top_k=200, generator=gen, device=device)
        return self.run.tokenizer.decode(prompt + ids) if self.ctx.is_main else None

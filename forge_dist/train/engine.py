"""The engine seam: everything between "here are this iteration's micro-batches" and "the weights
moved", so a DeepSpeed engine or a tensor/pipeline-parallel one plugs into the same loop.

The trainer calls, per iteration::

    loss = engine.forward_backward(micro_batches)   # list of (x, y); returns the mean loss
    stats = engine.step(lr)                           # clip, optimizer step, zero grads

and ``engine.eval_loss(x, y)``, ``engine.train()/eval()``, ``engine.save_state(dir, ctx)`` /
``engine.load_state(dir)`` (optimizer, scaler: whatever the engine owns), ``engine.model`` (the
module the engine trains), ``engine.full_state_dict(keep)`` (collective: the logical full weights for
the checkpoint's ``model/``, on rank 0 at least; ``keep`` False lets an engine drop them on that rank), ``engine.generation_model()`` (the module the
end-of-run sample is drawn from) and ``engine.forward_is_collective`` (True when every rank must
run that sampling forward, as under tensor parallelism). A parallel engine also syncs gradients
inside ``forward_backward``/``step``; the loop does not change.

LocalEngine is one process on CPU or one GPU: autocast for bfloat16/float16, a GradScaler for
float16 (its loss scale skips steps with inf/NaN gradients), accumulation of ``loss / n`` over the
n micro-batches, and clipping of the global gradient norm after unscaling (as upstream).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn as nn

from forge_dist.errors import CheckpointError
from forge_dist.io.statefile import save_state
from forge_dist.train.optimizer_state import read_optimizer_state, require_optimizer_files  # noqa: F401 (old path)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Batch = Tuple[torch.Tensor, torch.Tensor]


def compiled(module: nn.Module, compile) -> nn.Module:
    """``module`` under torch.compile when ``compile`` is True (inductor: what --compile gives) or
    a backend name (tests pass "aot_eager": the same tracing, graph breaks, hooks and autograd,
    without the C++ code generation that takes tens of seconds on a CPU).

    Inductor draws dropout masks from its own Philox stream unless ``fallback_random`` is set; it
    is set, so a compiled model draws exactly the eager masks: the tensor-parallel RNG regions
    (equal masks on a TP group where activations are replicated, different where sharded) and
    resumes that replay the RNG state then hold compiled as they are tested eager."""
    if not compile:
        return module
    if isinstance(compile, str):
        return torch.compile(module, backend=compile)
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    return torch.compile(module)


class Engine(Protocol):
    model: nn.Module

    def forward_backward(self, micro_batches: Sequence[Batch]) -> torch.Tensor: ...
    def step(self, lr: float) -> dict: ...
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def save_state(self, directory: str, ctx) -> None: ...
    def load_state(self, directory: str) -> None: ...
    def full_state_dict(self, keep: bool = True) -> Optional[dict]: ...
    def generation_model(self) -> nn.Module: ...


def clip_to_norm(params: Sequence[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients of ``params`` by torch's clip_grad_norm_ coefficient for a global
    ``norm`` that a parallel engine computed over all of its shards."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))


class LocalEngine:
    name = "local"
    forward_is_collective = False  # one process: rank 0 alone samples

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: str, dtype: str,
                 grad_clip: float = 0.0, compile: bool = False):
        self.model = model
        self.module = compiled(model, compile)  # what runs the forward
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == "float16")
        self.skipped_steps = 0  # float16 steps skipped by the scaler (inf/NaN gradients)
        self._params: List[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]

    def autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def forward_backward(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            with self.micro_batch_context(last=i + 1 == n):
                with self.autocast():
                    _, loss = self.module(self.to_device(x), self.to_device(y))
                self.scaler.scale(loss / n).backward()
            total += loss.detach().float()
        return total / n

    def micro_batch_context(self, last: bool):
        """Around one micro-batch's forward and backward (a parallel engine defers its gradient
        reduction to the last one)."""
        return contextlib.nullcontext()

    def step(self, lr: float) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        grad_norm: Optional[torch.Tensor] = None
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.scaler.step(self.optimizer)
        scaler_stats = self._update_scaler()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, **scaler_stats}

    def _update_scaler(self) -> dict:
        """GradScaler bookkeeping for float16: a step was skipped when the scale dropped (an inf or
        NaN gradient); reports the scale and the running count of skipped steps for metrics."""
        if not self.scaler.is_enabled():
            self.scaler.update()
            return {}
        before = self.scaler.get_scale()
        self.scaler.update()
        after = self.scaler.get_scale()
        self.skipped_steps += int(after < before)
        return {"loss_scale": after, "skipped_steps": self.skipped_steps}

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            _, loss = self.module(self.to_device(x), self.to_device(y))
        return loss.float()

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. another weight_decay_split: the parameter groups differ
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this run's optimizer ({e}); "
                                  f"keep weight_decay_split as it was, or start from the weights with "
                                  f"--init_from prev_run") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save_state(self, directory: str, ctx) -> None:
        if ctx.is_main:  # one process owns the whole optimizer state
            save_state(self.state_dict(), directory, "optimizer")

    def load_state(self, directory: str) -> None:
        from forge_dist.train.sharded_save import is_sharded_checkpoint, load_engine_state

        if is_sharded_checkpoint(directory):  # weights and optimizer state, this rank's pieces
            require_optimizer_files(directory)
            load_engine_state(self, directory, getattr(self, "groups", None))
            return
        # optimizer.*, or the logical AdamW copy of a DeepSpeed checkpoint (any ZeRO stage)
        self.load_state_dict(read_optimizer_state(directory, self.optimizer, self.model, map_location=str(self.device)))

    def save_gathered_state(self, directory: str, ctx, full: Optional[dict]) -> None:
        """A parallel engine's save: ``full`` is the one-process optimizer state dict it gathered
        (on rank 0); rank 0 writes it with the scaler, the engine's name and the layout that wrote it."""
        if ctx.is_main:
            save_state({"optimizer": full, "scaler": self.scaler.state_dict(), "engine": self.name,
                        "layout": ctx.layout()}, directory, "optimizer")

    def full_state_dict(self, keep: bool = True) -> dict:
        """The logical weights written to the checkpoint's model/ (the module's own state here)."""
        return self.model.state_dict()

    def generation_model(self) -> nn.Module:
        return self.model

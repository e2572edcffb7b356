"""The one-process reference of the parity tests: forge_dist's LocalEngine trained on the global
batch, what a spawned world's losses, grad norms, gradients and weights are compared against."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

Batches = Callable[[int], List[Tuple[torch.Tensor, torch.Tensor]]]


def local_engine(model, cfg, clip: float):
    """LocalEngine on CPU in float32 with the optimizer ``cfg`` builds."""
    from forge_dist.train.engine import LocalEngine
    from forge_dist.train.optim import build_optimizer

    return LocalEngine(model, build_optimizer(model, cfg, "cpu"), "cpu", "float32", clip)


def run_local(engine, model, iterations: Iterable[int], batches: Batches, lr: Callable[[int], float],
              grads_at: Optional[int] = None) -> Dict:
    """{"loss", "grad_norm"}: one per iteration; "weights": the state dict after the last step;
    "grads": every gradient after iteration ``grads_at``'s backward (when given). ``batches(it)``:
    the global micro-batches of iteration ``it``."""
    out = {"loss": [], "grad_norm": []}
    for it in iterations:
        out["loss"].append(engine.forward_backward(batches(it)).item())
        if it == grads_at:
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        out["grad_norm"].append(float(engine.step(lr(it))["grad_norm"]))
    out["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out

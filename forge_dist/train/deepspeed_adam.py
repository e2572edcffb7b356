"""The Adam optimizers a DeepSpeed run may step with, as the checkpoints see them.

Our torch AdamW, torch's AdamW built by DeepSpeed (``"torch_adam": true``), DeepSpeed's FusedAdam
(the config's ``"optimizer"`` section; on a CPU accelerator its ``fused_adam`` op runs the
``cpu_adam`` kernel) and DeepSpeedCPUAdam (the section with ``offload_optimizer``) all keep Adam's
state per stepped tensor: ``exp_avg``, ``exp_avg_sq`` and ``step``, the entries forge_dist's
checkpoints hold, so any of them resumes any other's checkpoint. They differ in the step: torch keeps
a float tensor, DeepSpeed's a Python int, and FusedAdam advances only the last tensor's of each group
(fused_adam.py: ``state['step'] += 1`` after the loop), so the run's step is the largest one.

DeepSpeed's CPU kernel (csrc/includes/cpu_adam.h, ``IncrementStep``) keeps beta^t of Adam's bias
correction (Kingma & Ba 2015, Algorithm 1) as a running float product, advanced once per step, and
recomputes it with ``pow`` when the step jumps, as a resumed run's first step does. pow and the
product differ in the last bit (beta2 = 0.99: from t = 3 on), so a resumed run would not continue
the uninterrupted one exactly: ``replay_bias_correction`` advances the kernel's product step by step
to the saved step on a one-element tensor, as the uninterrupted run did.
"""
from __future__ import annotations

from typing import Optional

import torch


def adam_kind(opt) -> Optional[str]:
    """"torch", "fused" (DeepSpeed's FusedAdam), "cpu_adam" (DeepSpeedCPUAdam), or None for an
    optimizer whose state is not Adam's."""
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return "torch"
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    except ImportError:
        return None
    if isinstance(opt, DeepSpeedCPUAdam):  # before FusedAdam: neither derives from the other, but be explicit
        return "cpu_adam"
    if isinstance(opt, FusedAdam):
        return "fused"
    return None


def current_step(opt) -> int:
    """The optimizer's step count (0 before the first step)."""
    steps = [int(s["step"]) for s in opt.state.values() if "step" in s]
    return max(steps, default=0)


def new_step(opt, step: int, device) -> object:
    """Adam's ``step`` entry holding ``step`` the way ``opt`` keeps it."""
    if adam_kind(opt) == "torch":
        return torch.tensor(float(step), dtype=torch.float32, device=device)
    return int(step)


def set_step(opt, step: int) -> None:
    """Every state entry of ``opt`` at ``step``, and DeepSpeed's CPU kernel where ``opt`` uses one."""
    for entry in opt.state.values():
        if "step" in entry:
            if torch.is_tensor(entry["step"]):
                entry["step"].fill_(float(step))
            else:
                entry["step"] = int(step)
    replay_bias_correction(opt, step)


def _cpu_kernel_step(opt):
    """fn(t, group) running one step of DeepSpeed's CPU Adam kernel at step t on a one-element
    tensor (the kernel's running beta products advance as in a real step), or None."""
    kind = adam_kind(opt)
    if kind == "cpu_adam":
        return lambda t, g, p, grad, m, v: opt.ds_opt_adam.adam_update(
            opt.opt_id, t, g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"],
            g["bias_correction"], p, grad, m, v)
    if kind == "fused":
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":  # the CUDA kernel computes beta^t from t every step
            return None
        return lambda t, g, p, grad, m, v: opt.multi_tensor_adam(
            2048 * 32, opt._dummy_overflow_buf, [[grad], [p], [m], [v]], g["lr"], g["betas"][0], g["betas"][1],
            g["eps"], t, opt.adam_w_mode, 1 if g["bias_correction"] else 0, g["weight_decay"])
    return None


def replay_bias_correction(opt, step: int) -> None:
    """Advance DeepSpeed's CPU kernel state to ``step`` through 1, 2, ..., ``step`` (see the module
    doc), for each parameter group's hyperparameters; nothing for other optimizers."""
    run = _cpu_kernel_step(opt)
    if run is None or step <= 0:
        return
    for group in opt.param_groups:
        p, grad, m, v = (torch.zeros(1) for _ in range(4))
        for t in range(1, step + 1):
            run(t, group, p, grad, m, v)

"""Model FLOPs utilisation (MFU) and the run's metric files (metrics.jsonl, TensorBoard).

MFU = tokens/s x F / P, with F the training FLOPs per token (PaLM appendix B, as nanoGPT):

    F = 6 N + 12 sum_l H_l Q_l T

N the parameters without the learned position table (model.num_params()), H_l and Q_l the heads and
the query/key head width of layer l, T the sequence length (block_size). 6N counts the matmuls
(2 forward + 4 backward flops per weight per token), the second term the attention scores and
their weighted sum (causality not discounted). P is the device's dense peak for the training dtype
from PEAK_FLOPS (datasheet figures without sparsity; float32 means TF32 tensor cores, which the
trainer enables on CUDA). An unknown device gets no MFU rather than a guess; --peak_flops sets P.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Tuple

TENSORBOARD_DIR = "tensorboard"

# (device-name pattern, {dtype: dense peak FLOP/s}); first match wins, so specific names come first.
PEAK_FLOPS: Tuple[Tuple[str, dict], ...] = (
    (r"\bGH200\b", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    (r"\bH200\b", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    (r"\bH100\b.*\bPCIe\b", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    (r"\bH100\b.*\bNVL\b", {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12}),
    (r"\bH100\b", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),  # SXM
    (r"\bA100\b", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    (r"\bL40S\b", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    (r"\bL4\b", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    (r"\bA10\b", {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),
    (r"\bV100\b", {"float16": 125e12, "float32": 15.7e12}),  # no bf16 tensor cores
)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return device


def peak_flops(name: str, dtype: str) -> Optional[float]:
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, name):
            return peaks.get(dtype)
    return None


def flops_per_token(model) -> float:
    cfg = model.config
    attn = 0
    for i in range(cfg.n_layer):
        layer = cfg.for_layer(i)
        q = layer.n_qk_head_dim or layer.head_dim
        attn += 12 * layer.n_head * q * cfg.block_size
    return 6 * model.num_params() + attn


class MFU:
    """tokens/s -> fraction of the device's peak; ``None`` (and a reason) when the peak is unknown."""

    def __init__(self, model, device: str, dtype: str, peak: Optional[float] = None,
                 flops: Optional[float] = None):
        # ``flops``: F counted on the full model, when ``model`` is a tensor-parallel shard
        self.flops_per_token = flops if flops is not None else flops_per_token(model)
        self.device = device_name(device)
        self.peak = peak if peak is not None else peak_flops(self.device, dtype)
        self.reason = None if self.peak else f"MFU n/a (unknown peak for {self.device})"

    def __call__(self, tokens_per_s: float) -> Optional[float]:
        return tokens_per_s * self.flops_per_token / self.peak if self.peak else None


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars, rank 0 only."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool, append: bool = False):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.history = []
        self._tb = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self._fh = open(self.path, "a" if append else "w", encoding="utf-8")
            if tensorboard:
                self._tb = _tensorboard_writer(os.path.join(out_dir, TENSORBOARD_DIR))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None and "iter" in record:
            for key, value in record.items():
                if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["iter"])

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


def _tensorboard_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional [logging] extra is not installed
        return None
    return SummaryWriter(log_dir=log_dir)


def rewind_metrics(out_dir: str, iteration: int) -> None:
    """Before a resume at ``iteration``: drop what the first run logged from there on (it will be
    logged again), keeping the evaluation at ``iteration`` itself, which is not repeated."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = []
    for r in read_metrics(out_dir):
        if r.get("iter", -1) < iteration:
            kept.append(r)
        elif r.get("iter") == iteration and "val_loss" in r:  # with the per-dataset losses (val_loss/<name>)
            kept.append({"iter": iteration, **{k: v for k, v in r.items() if k.startswith(("train_loss", "val_loss"))}})
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kept)


def read_metrics(out_dir: str) -> list:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

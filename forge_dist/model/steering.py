"""Steering vectors: static ones read from .npy files, and learned steering vectors (LSV).

Where they act (upstream's forward loop counts blocks from 1): steering point k >= 1 is the
output of block k, i.e. of ``transformer.h[k-1]``; point 0 is the embedding output, before the
first block (LSV only). At a point, in upstream's order:

    1. LSV            x = lsv_matrix(x)                  if use_lsv and k == apply_lsv_at_layer_idx
    2. static vector  x = x + apply_vector_scaling_factor * v   if k == apply_vector_at_layer_idx
    3. capture        record x for the mean over batch and time if k == obtain_vector_at_layer_idx

The static vector v (n_embd,) is a non-persistent buffer (never trained, not in the state dict,
replicated under tensor parallelism: it acts elementwise on the full hidden size). Captured means
are written only when asked, ``model.steering.save_obtained(path)``; upstream rewrote the file in
every forward.

LSV variants (``lsv_variant``, module ``lsv_matrix`` of the GPT, one entry per dataset): the
trainer selects the dataset of each batch with ``set_lsv_index(model, i)``; sampling can blend
datasets with ``set_lsv_mixture(model, weights)``. The selection s (lsv_dataset_num,) is
scale * onehot(i), or the mixture weights. Only the selected dataset's entries get a gradient,
because s is zero elsewhere (upstream's per-row requires_grad toggling had no effect).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.variants import LSV

LSV_MLP_WIDTH = 64  # hidden width of the per-dataset MLPs (upstream constant)


# --- static steering vectors ----------------------------------------------------------------
def load_vector(path: str, n_embd: int, option: str = "apply_vector_file") -> torch.Tensor:
    """A (n_embd,) float32 vector from a plain .npy (read without pickle). Upstream's captured
    files have shape (1, 1, n_embd); any shape of n_embd entries with unit leading dims is accepted."""
    from forge_dist.model.init import read_plain_npy

    data = read_plain_npy(path, option)
    if not isinstance(data, np.ndarray) or data.shape[-1:] != (n_embd,) or data.size != n_embd \
            or not np.issubdtype(data.dtype, np.number):
        got = getattr(data, "shape", type(data).__name__)
        raise ConfigError(f"{option}={path!r} holds shape {got}; a steering vector has shape (n_embd,) = "
                          f"({n_embd},)")
    return torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(n_embd))


class SteeringVectors(nn.Module):
    """Static steering: adds the file vector at one point and records the mean at another.

    The record is the mean over every position of every sequence seen since ``reset_obtained()``
    (training and eval forwards alike), kept in float32 on the activations' device. With the
    residual stream split along the sequence (tensor parallelism), ``reduce_stats(value, "sum")``
    sums the recorded sum and count over the ranks (None on one device)."""

    reduce_stats = None

    def __init__(self, config):
        super().__init__()
        self.apply_at = config.apply_vector_at_layer_idx
        self.obtain_at = config.obtain_vector_at_layer_idx
        self.scale = config.apply_vector_scaling_factor
        self.obtain_file = config.obtain_vector_file
        vector = (load_vector(config.apply_vector_file, config.n_embd) if self.apply_at is not None
                  else torch.zeros(0))
        self.register_buffer("vector", vector, persistent=False)  # (n_embd,) or empty
        self.reset_obtained()

    def forward(self, x: torch.Tensor, point: int) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if point == self.apply_at:
            x = x + self.scale * self.vector.to(x.dtype)
        if point == self.obtain_at:
            self._record(x)
        return x

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        s = x.detach().float().reshape(-1, x.shape[-1]).sum(0)
        n = x.shape[0] * x.shape[1]
        if self.reduce_stats is not None:
            s = self.reduce_stats(s, "sum")
            n = int(self.reduce_stats(torch.tensor(float(n), device=s.device), "sum").item())
        self._sum = s if self._sum is None else self._sum + s.to(self._sum.device)
        self._count += n

    def reset_obtained(self) -> None:
        self._sum: Optional[torch.Tensor] = None
        self._count = 0

    def obtained(self) -> torch.Tensor:
        """The mean (n_embd,) of the recorded outputs."""
        if self.obtain_at is None:
            raise ConfigError("obtain_vector_at_layer_idx is None: set it to the block (1..n_layer) whose "
                              "output mean you want")
        if self._count == 0:
            raise ConfigError(f"no output of block {self.obtain_at} was recorded yet: run forward passes "
                              f"(e.g. an eval pass) before asking for the obtained vector")
        return self._sum / self._count

    def save_obtained(self, path: Optional[str] = None) -> str:
        """Write the mean as a (n_embd,) float32 .npy, atomically; returns the file written
        (``path`` or obtain_vector_file, with .npy appended when missing, as numpy.save does)."""
        from forge_dist.atomic import write_file_atomic  # lazy: forge_dist.io imports the model

        path = path or self.obtain_file
        if path is None:
            raise ConfigError("obtain_vector_file is None: pass a path to save_obtained() or set it")
        path = path if path.endswith(".npy") else path + ".npy"
        vec = self.obtained().cpu().numpy().astype(np.float32)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, vec, allow_pickle=False)

        write_file_atomic(path, write)
        return os.path.abspath(path)


# --- learned steering vectors ---------------------------------------------------------------
class LSVBase(nn.Module):
    """Dataset selection shared by every variant: index (one-hot mode) or mixture weights."""

    def __init__(self, config):
        super().__init__()
        self.lsv_dataset_num = config.lsv_dataset_num
        self.lsv_index = config.lsv_index or 0
        self.lsv_scaling_factor = 1.0
        self.mode = 1  # upstream's modes: 1 = one-hot index, 2 = user mixture weights
        self.register_buffer("mixture_weights", torch.zeros(config.lsv_dataset_num), persistent=False)

    def set_index(self, index: int) -> None:
        if not 0 <= int(index) < self.lsv_dataset_num:
            raise ConfigError(f"LSV index {index} is out of range: lsv_dataset_num={self.lsv_dataset_num} "
                              f"datasets have indices 0..{self.lsv_dataset_num - 1}")
        self.lsv_index, self.mode = int(index), 1

    def set_mixture(self, weights: Sequence[float]) -> None:
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != self.lsv_dataset_num:
            raise ConfigError(f"LSV mixture has {w.numel()} weights; give one per dataset "
                              f"(lsv_dataset_num={self.lsv_dataset_num})")
        self.mixture_weights.copy_(w.to(self.mixture_weights.device))
        self.mode = 2

    def selection(self, like: torch.Tensor) -> torch.Tensor:
        """s (lsv_dataset_num,): scale * onehot(index), or the mixture weights (unscaled, as upstream)."""
        if self.mode == 2:
            return self.mixture_weights.to(like.dtype)
        one_hot = F.one_hot(torch.tensor(self.lsv_index, device=like.device), self.lsv_dataset_num)
        return one_hot.to(like.dtype) * self.lsv_scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return x + self.steer(x)


@LSV.register("one_hot")
class OneHotLSV(LSVBase):
    """x + s M: one learned vector per dataset, M = ``lsv_matrix`` (datasets, n_embd), N(0, 0.02)."""

    def __init__(self, config):
        super().__init__(config)
        self.lsv_matrix = nn.Parameter(torch.empty(config.lsv_dataset_num, config.n_embd).normal_(0.0, 0.02))

    def steer(self, x):
        return (self.selection(self.lsv_matrix) @ self.lsv_matrix).to(x.dtype)  # (C,)


@LSV.register("linear_comb")
class LinearCombinationLSV(OneHotLSV):
    """x + (s W) M: each dataset's vector is a learned combination (row of ``linear_comb_matrix``
    (datasets, datasets)) of every dataset's base vector, so M's rows all learn from every dataset."""

    def __init__(self, config):
        super().__init__(config)
        D = config.lsv_dataset_num
        self.linear_comb_matrix = nn.Parameter(torch.empty(D, D).normal_(0.0, 0.02))

    def steer(self, x):
        return ((self.selection(self.lsv_matrix) @ self.linear_comb_matrix) @ self.lsv_matrix).to(x.dtype)


def lsv_mlp(n_embd: int, depth: int) -> nn.Sequential:
    """C -> 64 -> [64 ->] C with ReLU between (depth 3 or 2 linears; upstream's names 0, 2, 4)."""
    layers = [nn.Linear(n_embd, LSV_MLP_WIDTH), nn.ReLU()]
    if depth == 3:
        layers += [nn.Linear(LSV_MLP_WIDTH, LSV_MLP_WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(LSV_MLP_WIDTH, n_embd))


class MLPBankLSV(LSVBase):
    """One small MLP per dataset (``mlps.{i}``); the update is sum_i w_i mlp_i(x)."""
    depth = 3

    def __init__(self, config):
        super().__init__(config)
        self.mlps = nn.ModuleList(lsv_mlp(config.n_embd, self.depth) for _ in range(config.lsv_dataset_num))

    def mix(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # w (D,) or (B, T, D) -> (B, T, C)
        outs = torch.stack([mlp(x) for mlp in self.mlps], dim=-1)  # (B, T, C, D)
        return (outs * w.unsqueeze(-2)).sum(-1)


@LSV.register("one_hot_mlp")
class OneHotMLPLSV(MLPBankLSV):
    """x + scale * mlp_index(x): only the selected dataset's MLP runs (and gets a gradient); in
    mixture mode x + sum_i w_i mlp_i(x)."""

    def steer(self, x):
        if self.mode == 2:
            return self.mix(x, self.mixture_weights.to(x.dtype))
        return self.mlps[self.lsv_index](x) * self.lsv_scaling_factor


class RoutedLSV(MLPBankLSV):
    """x + sum_i r_i(x) mlp_i(x) with per-token routing weights r(x) (B, T, D) from the input:
    these variants ignore the dataset index and the mixture (as upstream)."""

    def steer(self, x):
        return self.mix(x, self.route(x))


@LSV.register("ohmg")
class GatedMLPLSV(RoutedLSV):
    """r = sigmoid(W x + b): independent gates, ``router.0``."""
    router_activation = nn.Sigmoid

    def __init__(self, config):
        super().__init__(config)
        self.router = nn.Sequential(nn.Linear(config.n_embd, config.lsv_dataset_num), self.router_activation())

    def route(self, x):
        return self.router(x)


class LinearRoutedLSV(RoutedLSV):
    """Two-linear MLPs and a bare ``router`` linear."""
    depth = 2

    def __init__(self, config):
        super().__init__(config)
        self.router = nn.Linear(config.n_embd, config.lsv_dataset_num)


@LSV.register("ohmm")
class MoEMLPLSV(LinearRoutedLSV):
    """r = softmax((W x + b) / temperature), temperature 1 (upstream's default)."""
    router_temperature = 1.0

    def route(self, x):
        return F.softmax(self.router(x) / self.router_temperature, dim=-1)


@LSV.register("ohmt")
class TopKMLPLSV(LinearRoutedLSV):
    """Hard top-2 routing: r = 1 on the two largest router logits, 0 elsewhere, with a
    straight-through gradient (d r / d logits = identity): r = mask + logits - stopgrad(logits)."""
    top_k = 2

    def route(self, x):
        logits = self.router(x)  # (B, T, D)
        k = min(self.top_k, logits.shape[-1])
        mask = torch.zeros_like(logits).scatter_(-1, logits.topk(k, dim=-1).indices, 1.0)
        return mask + (logits - logits.detach())


@LSV.register("ohma")
class AttentionMLPLSV(RoutedLSV):
    """r = softmax(x Q^T): routing by dot product with learned queries ``queries`` (D, C) ~ N(0, 1)."""
    depth = 2

    def __init__(self, config):
        super().__init__(config)
        self.queries = nn.Parameter(torch.randn(config.lsv_dataset_num, config.n_embd))

    def route(self, x):
        return F.softmax(x @ self.queries.t(), dim=-1)


@LSV.register("mol")
class MixtureOfLSV(GatedMLPLSV):
    """r = softmax(W x + b) over the datasets (mixture of LSV MLPs), ``router.0``."""
    router_activation = functools.partial(nn.Softmax, dim=-1)


# --- model-level API --------------------------------------------------------------------------
def attach_steering(model: nn.Module, config) -> None:
    """Give the GPT its ``steering`` (static vectors) and, with use_lsv, ``lsv_matrix`` modules.
    Called before weight init, so the LSV linears get the model's linear init (as upstream)."""
    model.steering = SteeringVectors(config)
    if config.use_lsv:
        model.lsv_matrix = LSV.build(config.lsv_variant, config, option="lsv_variant")


def steer(model: nn.Module, x: torch.Tensor, point: int) -> torch.Tensor:
    """Everything that acts at steering point ``point`` (0 = embeddings, k = output of block k)."""
    cfg = model.config
    if cfg.use_lsv and point == cfg.apply_lsv_at_layer_idx:
        x = model.lsv_matrix(x)
    if point in (cfg.apply_vector_at_layer_idx, cfg.obtain_vector_at_layer_idx):
        x = model.steering(x, point)
    return x


def lsv_module(model: nn.Module) -> LSVBase:
    """The model's LSV module (also found inside DDP / torch.compile wrappers)."""
    for m in model.modules():
        if isinstance(m, LSVBase):
            return m
    raise ConfigError("the model has no learned steering vectors: build it with use_lsv=True, "
                      "lsv_dataset_num and apply_lsv_at_layer_idx")


def set_lsv_index(model: nn.Module, index: int) -> None:
    """Select dataset ``index`` (one-hot mode). The trainer calls this once per batch."""
    lsv_module(model).set_index(index)


def set_lsv_mixture(model: nn.Module, weights: Sequence[float]) -> None:
    """Blend the datasets with user weights (mixture mode, until the next set_lsv_index)."""
    lsv_module(model).set_mixture(weights)


def set_lsv_scaling_factor(model: nn.Module, factor: float) -> None:
    """Scale of the one-hot selection (upstream's sample.py --lsv_scaling_factor); default 1."""
    lsv_module(model).lsv_scaling_factor = float(factor)


# --- config rules ---------------------------------------------------------------------------
def _check_point(cfg, name: str, lowest: int) -> None:
    k = getattr(cfg, name)
    if k is not None and not lowest <= k <= cfg.n_layer:
        where = "0 = the embedding output, " if lowest == 0 else ""
        raise ConfigError(f"{name}={k} is outside {lowest}..n_layer={cfg.n_layer} ({where}k = the output of "
                          f"block k, counted from 1 as upstream)")


@register_rule
def rule_steering(cfg):
    _check_point(cfg, "apply_vector_at_layer_idx", 1)
    _check_point(cfg, "obtain_vector_at_layer_idx", 1)
    if cfg.apply_vector_at_layer_idx is not None and not cfg.apply_vector_file:
        raise ConfigError("apply_vector_at_layer_idx is set but apply_vector_file is None: give the .npy "
                          "vector (shape (n_embd,)) to add")
    if cfg.lsv_dataset_num is not None and cfg.lsv_dataset_num < 1:
        raise ConfigError(f"lsv_dataset_num={cfg.lsv_dataset_num} must be >= 1 (one entry per dataset)")
    if not cfg.use_lsv:
        return
    if cfg.lsv_dataset_num is None:
        raise ConfigError("use_lsv=True needs lsv_dataset_num, the number of datasets trained together "
                          "(upstream sets it to len(dataset_list); set it from your data configuration)")
    if cfg.apply_lsv_at_layer_idx is None:
        raise ConfigError("use_lsv=True needs apply_lsv_at_layer_idx (0 = after the embeddings, k = after "
                          "block k); upstream silently never applies the LSV without it")
    _check_point(cfg, "apply_lsv_at_layer_idx", 0)
    if cfg.lsv_index is not None and not 0 <= cfg.lsv_index < cfg.lsv_dataset_num:
        raise ConfigError(f"lsv_index={cfg.lsv_index} is outside 0..lsv_dataset_num-1 = "
                          f"0..{cfg.lsv_dataset_num - 1}")

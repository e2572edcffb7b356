"""What the training loop does for the model's training-time features, whatever the engine.

Per optimizer step ``it``, before its forward passes (``begin_step``):

  quantization   ``set_quant_iteration(model, it)``: the schedule (quant_scheduler, warmup,
                 full_quant_iteration) follows the training iteration, so a resumed run quantizes
                 exactly as an uninterrupted one (a module left alone would count its own calls)
  LSV            ``set_lsv_index(model, i)`` with i the dataset the loader draws for ``it``
                 (--dataset_list), when the model has learned steering vectors

and during them a forward hook on the GPT records, per training micro-batch, the plain
cross-entropy (``GPT.last_ce_loss``), the MoE auxiliary losses the model added to it for the
backward, the MoE layers' per-expert token counts and dropped tokens, and the LSV index the
forward saw. ``end_step`` turns them into the
step's numbers (``StepParts``); the trainer logs them at log steps. The hook sits on the model
itself, so the local, tensor/data-parallel and DeepSpeed engines are all covered without any of
them knowing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn


@dataclass
class StepParts:
    """One optimizer step's records (tensors stay on the device until a log step reads them)."""

    ce: Optional[torch.Tensor] = None  # mean cross-entropy over the step's micro-batches
    aux: Optional[torch.Tensor] = None  # mean MoE auxiliary loss (backpropagated with the CE)
    tokens_per_expert: Dict[str, torch.Tensor] = field(default_factory=dict)  # summed over micro-batches
    dropped: Dict[str, torch.Tensor] = field(default_factory=dict)
    health: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)  # mean over micro-batches
    lsv_index: Optional[int] = None


class _Forward(NamedTuple):
    """What the hook saw of one training forward."""

    ce: Optional[torch.Tensor]  # the cross-entropy (GPT.last_ce_loss)
    aux: Optional[torch.Tensor]  # the MoE auxiliary losses the model added to it
    counts: Dict[str, torch.Tensor]
    dropped: Dict[str, torch.Tensor]
    health: Dict[str, Dict[str, torch.Tensor]]
    lsv_index: Optional[int]


def _kind(m: nn.Module) -> str:
    from forge_dist.model.quantize import ActQuant

    if isinstance(m, ActQuant):
        return "activation"
    return "embedding" if hasattr(m, "num_embeddings") else "linear"


class ModelFeatures:
    def __init__(self, model: nn.Module):
        from forge_dist.model.moe import MoELayer
        from forge_dist.model.quantize import QuantizedModule

        self.model = model
        cfg = model.config
        self.quantized = [m for m in model.modules() if isinstance(m, QuantizedModule)]
        self.moe = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
        self.capacity = any(m.capacity_factor is not None for _, m in self.moe)
        self.lsv = None
        if cfg.use_lsv:
            from forge_dist.model.steering import lsv_module

            self.lsv = lsv_module(model)
        self._active = False
        self._records: List[_Forward] = []
        self._handle = model.register_forward_hook(self._hook)

    @property
    def use_moe(self) -> bool:
        return bool(self.moe)

    def close(self) -> None:
        self._handle.remove()

    # --- per step ---------------------------------------------------------------------------------
    def begin_step(self, iteration: int, dataset_index: Optional[int] = None) -> None:
        if self.quantized:
            from forge_dist.model.quantize import set_quant_iteration

            set_quant_iteration(self.model, iteration)
        if dataset_index is not None:
            self.select_dataset(dataset_index)
        self._records, self._active = [], True

    def select_dataset(self, index: int) -> None:
        """The LSV entry of dataset ``index`` (no-op without LSV)."""
        if self.lsv is not None:
            from forge_dist.model.steering import set_lsv_index

            set_lsv_index(self.model, index)

    def end_step(self) -> StepParts:
        self._active = False
        records, self._records = self._records, []
        parts = StepParts()
        if not records:
            return parts
        n = len(records)
        if all(r.ce is not None for r in records):
            parts.ce = torch.stack([r.ce for r in records]).sum() / n
        if all(r.aux is not None for r in records):
            parts.aux = torch.stack([r.aux for r in records]).sum() / n
        for r in records:
            for name, c in r.counts.items():
                parts.tokens_per_expert[name] = parts.tokens_per_expert.get(name, 0) + c
            for name, d in r.dropped.items():
                parts.dropped[name] = parts.dropped.get(name, 0) + d
            for name, h in r.health.items():
                mine = parts.health.setdefault(name, {})
                for k, v in h.items():
                    mine[k] = mine.get(k, 0) + v / n
        parts.lsv_index = records[-1].lsv_index
        return parts

    def _hook(self, module: nn.Module, args, output) -> None:
        if not (self._active and module.training) or not isinstance(output, tuple) or output[1] is None:
            return
        ce = getattr(module, "last_ce_loss", None)
        aux = None
        if self.moe:  # read from the layers (loss - CE would lose the small term to rounding)
            terms = [a.detach().float() for _, m in self.moe for a in m.aux_losses]
            aux = torch.stack(terms).sum() if terms else torch.zeros((), device=output[1].device)
        counts = {name: m.last_tokens_per_expert for name, m in self.moe if m.last_tokens_per_expert is not None}
        dropped = {name: m.last_dropped_tokens for name, m in self.moe if m.last_dropped_tokens is not None}
        health = {name: {k: torch.stack([h[k] for h in m.health]).float().mean() for k in m.health[0]}
                  for name, m in self.moe if m.health}  # a shared layer: the mean over its uses
        self._records.append(_Forward(None if ce is None else ce.float(), aux, counts, dropped, health,
                                      None if self.lsv is None else int(self.lsv.lsv_index)))

    # --- what a log step reports ------------------------------------------------------------------
    def quant_levels(self) -> Dict[str, float]:
        """{kind: level} the quantizing modules used in this step (0 during quantized_linear's
        warmup); kinds: linear (weights), activation, embedding."""
        out: Dict[str, float] = {}
        for m in self.quantized:
            if m.quant_iteration is None:
                continue
            quantize, level = m.state_at(m.quant_iteration)
            kind = _kind(m)
            out[kind] = max(out.get(kind, 0.0), float(level) if quantize else 0.0)
        return out

    def moe_record(self, parts: StepParts, ctx) -> dict:
        """MoE metrics of a log step: per-layer token counts of the global batch (summed over the
        step's micro-batches and the data-parallel replicas), the smallest and largest share of
        any expert in its layer, and the dropped assignments when a capacity factor is set; and
        per layer, as flat scalars TensorBoard plots (``moe/<layer>/<metric>``): router_entropy,
        z_loss and load_balance_loss (unscaled, means over micro-batches and replicas),
        dropped_fraction and max_share (largest expert's share of the kept assignments). A
        collective (every rank calls it at the same steps)."""
        names = [name for name, _ in self.moe]
        counts = [parts.tokens_per_expert.get(name) for name in names]
        flat = [float(v) for c in counts if c is not None for v in c.tolist()]
        dropped = [float(parts.dropped.get(name, 0)) for name in names]
        health = [(name, k, float(v)) for name in names for k, v in sorted(parts.health.get(name, {}).items())]
        summed = ctx.sum_over_replicas(flat + dropped + [v for _, _, v in health])
        record: dict = {f"moe/{name}/{k}": v / ctx.dp_size  # means over the replicas' equal batches
                        for (name, k, _), v in zip(health, summed[len(flat) + len(dropped):])}
        summed = summed[:len(flat) + len(dropped)]
        per_layer, shares, i = {}, [], 0
        for name, c in zip(names, counts):
            if c is None:
                continue
            layer = [int(round(v)) for v in summed[i:i + c.numel()]]
            i += c.numel()
            per_layer[name] = layer
            total = sum(layer)
            if total > 0:
                shares += [v / total for v in layer]
            routed = total + float(summed[len(flat) + names.index(name)])
            record[f"moe/{name}/dropped_fraction"] = (routed - total) / routed if routed else 0.0
            record[f"moe/{name}/max_share"] = max(layer) / total if total else 0.0
        record["tokens_per_expert"] = per_layer
        if shares:
            record["expert_share_min"], record["expert_share_max"] = min(shares), max(shares)
        if self.capacity:
            record["dropped_tokens"] = int(round(sum(summed[len(flat):])))
        return record

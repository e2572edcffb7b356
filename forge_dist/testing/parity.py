"""Compare a tensor-parallel model with the single-process model, on one rank of a TP group.

For one configuration: build the plain GPT (fp32), copy it, parallelize the copy, run the same
batch through both (targets include ignored positions, -1), and compare, each against its own
tolerance (TOLERANCES, relative: ||tp - ref|| / ||ref||):

  loss             the mean cross-entropy
  grad             every gradient, gathered back to its logical shape with the shard metadata
                   after tp_grad_sync; a gradient that is mathematically zero (a key bias under
                   softmax) is rounding noise, so norms are floored at 1e-3 of the global norm
  grad norm        tp_grad_norm against the norm of the reference gradients
  step             the weights after one torch AdamW step, against the full model stepped with the
                   gathered TP gradients: exact, since AdamW is elementwise. (Against the
                   reference's own step the gap is the gradient gap magnified by AdamW's
                   1/(|g| + eps) on elements whose gradient is near eps: up to ~1e-4 in fp32.)
  sampling logits  the last-position logits without targets (vocab gather, padding cut)
  decoding logits  KV-cached decoding (prefill, then single tokens), without sequence parallelism
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict

import torch

from forge_dist.errors import ConfigError


TOLERANCES: Dict[str, float] = {"loss": 1e-6, "grad": 1e-5, "grad norm": 1e-5, "step": 0.0,
                                "sampling logits": 1e-5, "decoding logits": 1e-5}


@dataclass
class ParityReport:
    name: str
    status: str  # pass | mismatch | refused (no rule) | config (shapes do not divide / invalid)
    detail: str = ""
    worst: Dict[str, float] = field(default_factory=dict)  # category -> largest relative error


def rel_error(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor); inf when the shapes differ."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    diff = (a - b).norm().item()
    ref = max(b.norm().item(), floor)
    return diff / ref if ref > 0 else diff


def _batch(vocab: int, block: int, seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, block), generator=g)
    y = torch.randint(0, vocab, (batch, block), generator=g)
    y[0, :3] = -1  # ignored targets
    return x, y


def _decode_error(model, ref, x, n_layer: int) -> float:
    """KV-cached decoding: a prefill of all but 3 tokens, then one token at a time."""
    from forge_dist.model.cache import KVCache

    caches = KVCache(n_layer), KVCache(n_layer)
    T = x.shape[1]
    worst = 0.0
    for lo, hi in ((0, T - 3), (T - 3, T - 2), (T - 2, T - 1), (T - 1, T)):
        worst = max(worst, rel_error(model(x[:, lo:hi], cache=caches[0])[0], ref(x[:, lo:hi], cache=caches[1])[0]))
    return worst


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)


def compare_with_single(name: str, config_kwargs: dict, groups, parallel_config, seed: int = 0,
                        train: bool = True) -> ParityReport:
    """``train=False`` compares in eval mode (variants that are random in training, like rrelu)."""
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.metadata import gather_full_state_dict, tp_grad_norm, tp_grad_sync
    from forge_dist.parallel.tensor.plan import NoShardingRuleError

    try:
        cfg = ModelConfig(**config_kwargs)
        parallel_config.validate(cfg, groups.topology.world_size)
    except ConfigError as e:
        return ParityReport(name, "config", str(e))
    torch.manual_seed(seed)
    ref = GPT(cfg).train(train)
    model = copy.deepcopy(ref)
    try:
        parallelize(model, groups, parallel_config)
    except NoShardingRuleError as e:
        return ParityReport(name, "refused", str(e))
    x, y = _batch(cfg.vocab_size, cfg.block_size, seed + 1)

    errors: Dict[str, float] = {}  # "category: tensor" -> relative error
    ref_loss = ref(x, y)[1]
    loss = model(x, y)[1]
    errors["loss"] = rel_error(loss, ref_loss)
    ref_loss.backward()
    loss.backward()
    tp_grad_sync(model, groups)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    grads = gather_full_state_dict(model, groups, grads=True)
    if set(grads) != set(ref_params):
        return ParityReport(name, "mismatch", f"parameter names differ: {sorted(set(grads) ^ set(ref_params))}")
    ref_norm = torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]).norm()
    for n, g in grads.items():
        errors[f"grad: {n}"] = rel_error(g, ref_params[n].grad, floor=1e-3 * ref_norm.item())
    errors["grad norm"] = rel_error(tp_grad_norm(model, groups), ref_norm)
    with torch.no_grad():
        errors["sampling logits"] = rel_error(model(x)[0], ref(x)[0])
        if not (parallel_config.sequence_parallel and groups.tp.size > 1):  # one token cannot be split
            errors["decoding logits"] = _decode_error(model, ref, x, cfg.n_layer)

    stepped = copy.deepcopy(ref)  # the full model stepped with the gathered TP gradients
    for n, p in stepped.named_parameters(remove_duplicate=False):
        p.grad = grads[n].clone()
    for m in (stepped, model):
        _adamw(m).step()
    full = gather_full_state_dict(model, groups)
    for n, t in stepped.state_dict().items():
        errors[f"step: {n}"] = rel_error(full[n], t)
    worst: Dict[str, float] = {}
    for key, e in errors.items():
        category = key.split(":")[0]
        worst[category] = max(worst.get(category, 0.0), e)
    failed = {k: e for k, e in errors.items() if e > TOLERANCES[k.split(":")[0]]}
    if not failed:
        return ParityReport(name, "pass", "", worst)
    detail = "; ".join(f"{k}: {e:.3g} > {TOLERANCES[k.split(':')[0]]:g}" for k, e in sorted(failed.items())[:5])
    return ParityReport(name, "mismatch", detail, worst)

"""Compare an expert-parallel model with one process running the global batch.

The world of N ranks is laid out as (tp, dp, ep) with dp = N / tp; data-parallel rank d takes rows
[d B, (d+1) B) of a global batch of dp x B rows. The reference is the plain GPT (same seed)
on all dp x B rows in one forward, with ``capacity_groups = dp`` on its MoE layers (capacity is
counted per micro-batch per data-parallel rank, so the reference counts it per row block).
Compared, each relative to the reference (||got - ref|| / ||ref||), with EP_TOLERANCES:

  loss        the mean over data-parallel ranks of each rank's loss (CE + MoE aux losses)
  grad        every gradient after the engine's reduction (dense averaged over dp by DDP,
              experts over expert_dp, TP gathered), router, experts and dense parameters alike
  grad norm   forge_dist.parallel.expert.grads.grad_norm against the reference's
  records     tokens per expert of each MoE layer, summed over the data-parallel ranks
  step        the weights after one AdamW step against the one-process model stepped with the
              reduced gradients (exact: AdamW is elementwise; against the reference's own step
              the gap is the gradient gap magnified by 1/(|g| + eps) where |g| ~ eps)
  zero-1 step (DP > 1) the same step under ZeRO-1 (parallel/expert/zero.py: dense moments over dp,
              experts' over expert_dp), exact, each rank holding only its part of the moments
  per-token   the expert-parallel MoE layer's output against the per-token loop on one process
  checkpoint  (EP2xPP2) the pipeline engine's gathered weights and optimizer state, exact

EP2xPP2 runs expert parallelism inside 2 pipeline stages (compare_expert_pipeline).
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from forge_dist.testing.parity import ParityReport, rel_error

EP_TOLERANCES: Dict[str, float] = {"loss": 1e-6, "grad": 1e-5, "grad norm": 1e-5, "records": 0.0, "step": 0.0,
                                   "zero-1 step": 0.0, "per-token": 1e-5, "checkpoint": 0.0}

ROUTERS = {  # name -> MoE options (aux and z losses on, so the router learns in every case)
    "top1": dict(moe_top_k=1),
    "top2": dict(moe_top_k=2),
    "top1_capacity": dict(moe_top_k=1, moe_capacity_factor=1.0),
    "top2_capacity": dict(moe_top_k=2, moe_capacity_factor=1.25),
}


EXPERT_VARIANTS = ("swiglu", "dual_path", "kan", "identity")  # every other MLP variant as the expert (top-2)
VARIANT_LAYOUTS = ("EP4", "EP2xTP2")  # all-to-all alone, and with the experts TP-split inside



def reference_moe_model(cfg, seed: int):
    """The one-process GPT both sides start from, with a wider router than the 0.02 init so the
    routing choices are distinct and unbalanced."""
    from forge_dist.model.gpt import GPT
    from forge_dist.model.moe import MoELayer

    torch.manual_seed(seed)
    ref = GPT(cfg).train()
    for m in ref.modules():
        if isinstance(m, MoELayer):
            torch.nn.init.normal_(m.router.route_linear.weight, std=0.5)
    return ref

def ep_model_kwargs(case: str) -> dict:
    """A router case (ROUTERS) or ``expert=<mlp_variant>`` (top-2, dropless)."""
    extra = dict(moe_top_k=2, mlp_variant=case.split("=", 1)[1]) if case.startswith("expert=") else ROUTERS[case]
    return dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, use_moe=True, n_experts=4,
                moe_layer_freq=1, moe_aux_loss_coef=0.05, moe_z_loss_coef=0.01, bias=True, **extra)


def ep_cases(layout: str) -> List[str]:
    """The cases run at ``layout``: every router, and the expert variants at VARIANT_LAYOUTS."""
    variants = [f"expert={v}" for v in EXPERT_VARIANTS] if layout in VARIANT_LAYOUTS else []
    routers = [r for r in ROUTERS if not (layout == "EP2xTP2_ETP1_SP" and "capacity" in r)]
    return routers + variants


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)


def per_token_moe(layer, x: torch.Tensor) -> torch.Tensor:
    """y_n = sum_j w_nj expert_{e_nj}(x_n), one token at a time, dropless (the definition)."""
    flat = x.reshape(-1, x.shape[-1])
    r = layer.router(flat)
    rows = [sum(r.weights[n, j] * layer.experts[int(r.experts[n, j])](flat[n].view(1, 1, -1)).view(-1)
                for j in range(r.experts.shape[1])) for n in range(flat.shape[0])]
    return torch.stack(rows).view_as(x)


def compare_expert_parallel(name: str, config_kwargs: dict, groups, parallel_config, seed: int = 0,
                            batch: int = 2) -> ParityReport:
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.model.moe import MoELayer, collect_tokens_per_expert
    from forge_dist.parallel.expert import ExpertParallelExperts, apply_expert_parallel, declare_expert_params
    from forge_dist.parallel.data_parallel import data_parallel
    from forge_dist.parallel.expert.grads import grad_norm, reduce_expert_gradients
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.metadata import gather_full_state_dict, tp_grad_sync

    cfg = ModelConfig(**config_kwargs)
    parallel_config.validate(cfg, groups.topology.world_size)
    dp, d = groups.dp.size, groups.coord.dp
    ref = reference_moe_model(cfg, seed)
    model = copy.deepcopy(ref)
    # capacity per routing rank: data-parallel row blocks, cut again over TP when TP ranks split tokens
    splits = groups.tp.size if parallel_config.expert_tensor_parallel_size == 1 else 1
    for m in ref.modules():
        if isinstance(m, MoELayer):
            m.capacity_groups = dp * splits
    apply_expert_parallel(model, groups, parallel_config)
    if groups.tp.size > 1:
        parallelize(model, groups, parallel_config)
        declare_expert_params(model)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, cfg.vocab_size, (dp * batch, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (dp * batch, cfg.block_size), generator=g)
    rows = slice(d * batch, (d + 1) * batch)

    errors: Dict[str, float] = {}
    if cfg.moe_capacity_factor is None:
        errors["per-token"] = _per_token_error(model, ref, groups, cfg, batch, seed)
    ref_loss = ref(x, y)[1]
    ddp = data_parallel(model, groups)  # the engine's dense reduction (None for one replica)
    rows_in = []  # assignments this rank dispatches in its first MoE layer
    placed = next((m for m in model.modules() if isinstance(m, ExpertParallelExperts)), None)
    hook = placed.register_forward_pre_hook(lambda m, a: rows_in.append(a[0].shape[0])) if placed else None
    loss = (ddp or model)(x[rows], y[rows])[1]
    if hook is not None:
        hook.remove()
    errors["loss"] = rel_error(groups.dp.all_reduce(loss.detach()) / dp, ref_loss)
    dropped = sum(float(m.last_dropped_tokens) for m in ref.modules() if isinstance(m, MoELayer))
    ref_counts = collect_tokens_per_expert(ref)
    for k, c in collect_tokens_per_expert(model).items():
        errors[f"records: {k}"] = rel_error(groups.dp.all_reduce(c.double()), ref_counts[k].double())
    ref_loss.backward()
    loss.backward()
    params = list(model.parameters())
    tp_grad_sync(model, groups)  # as ParallelEngine.sync_gradients
    reduce_expert_gradients(params, groups)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    ref_norm = torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]).norm()
    grads = gather_full_state_dict(model, groups, grads=True)
    for n, grad in grads.items():
        if grad is None or ref_params[n].grad is None:
            if (grad is None) != (ref_params[n].grad is None):
                return ParityReport(name, "mismatch", f"{n}: gradient present on one side only")
            continue
        errors[f"grad: {n}"] = rel_error(grad, ref_params[n].grad, floor=1e-3 * ref_norm.item())
    errors["grad norm"] = rel_error(grad_norm(params, groups), ref_norm)
    stepped = GPT(cfg)  # the one-process model stepped with the reduced gradients
    stepped.load_state_dict(ref.state_dict())
    for n, p in stepped.named_parameters():
        p.grad = None if grads.get(n) is None else grads[n].clone()
    before = [p.detach().clone() for p in params]
    for opt in (_adamw(stepped.parameters()), _adamw(params)):
        opt.step()
    full = gather_full_state_dict(model, groups)
    own = stepped.state_dict()
    for n, t in full.items():
        errors[f"step: {n}"] = rel_error(t, own[n])
    if dp > 1:  # the same step under ZeRO-1 (--zero_stage 1): experts' state over expert_dp, dense over dp
        errors.update(_zero1_step(model, params, before, groups, own))
    report = _report(name, errors)
    report.worst["dropped"] = dropped  # > 0: the capacity cases do drop (in the reference)
    if rows_in and cfg.moe_capacity_factor is None:  # this rank's share of its replica's assignments
        report.worst["routed share"] = rows_in[0] / (batch * cfg.block_size * cfg.moe_top_k)
    return report


def _zero1_step(model, params, before, groups, own) -> Dict[str, float]:
    """The step from the same weights and gradients with the native engine's ZeRO-1 optimizer
    (train/optim.build_optimizer: ExpertZeroOptimizer with placed experts) against ``own``, the
    one-process model after one AdamW step; and each rank holds only its part of the moments."""
    from forge_dist.parallel.expert.zero import ExpertZeroOptimizer
    from forge_dist.parallel.tensor.metadata import gather_full_state_dict
    from forge_dist.parallel.zero import is_zero, local_state, zero_optimizer

    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    group = [{"params": params, "weight_decay": 0.1}]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99))  # _adamw's
    experts = any(getattr(p, "allreduce", True) is False for p in params)
    opt = ExpertZeroOptimizer(group, groups, **hyper) if experts else zero_optimizer(group, groups.dp, **hyper)
    opt.step()
    full = gather_full_state_dict(model, groups)
    errors = {f"zero-1 step: {n}": rel_error(t, own[n]) for n, t in full.items()}
    held = sum(1 for st in local_state(opt).values() if st)
    parts = opt.optimizers if experts else [opt]
    # a sharded part holds fewer states than its parameters (the rest are other replicas')
    errors["zero-1 step: sharded"] = float(not any(is_zero(o) for o in parts) or held >= len(params))
    return errors


def _per_token_error(model, ref, groups, cfg, batch: int, seed: int) -> float:
    """The placed MoE layer on this rank's own tokens against the per-token loop (dropless)."""
    from forge_dist.model.moe import MoELayer

    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    ref_layer = next(m for m in ref.modules() if isinstance(m, MoELayer))
    g = torch.Generator().manual_seed(seed + 100 + groups.coord.dp)  # different tokens per replica
    h = torch.randn(batch, cfg.block_size, cfg.n_embd, generator=g)
    with torch.no_grad():
        return rel_error(layer(h), per_token_moe(ref_layer, h))


def _report(name: str, errors: Dict[str, float]) -> ParityReport:
    worst: Dict[str, float] = {}
    for key, e in errors.items():
        category = key.split(":")[0]
        worst[category] = max(worst.get(category, 0.0), e)
    failed = {k: e for k, e in errors.items() if e > EP_TOLERANCES[k.split(":")[0]]}
    if not failed:
        return ParityReport(name, "pass", "", worst)
    detail = "; ".join(f"{k}: {e:.3g} > {EP_TOLERANCES[k.split(':')[0]]:g}"
                       for k, e in sorted(failed.items(), key=lambda kv: -kv[1])[:5])
    return ParityReport(name, "mismatch", detail, worst)


# --- expert parallelism inside pipeline stages (EP2xPP2; with TP=2 in the world of 8 of test_pp_parity) --
N_MICRO = 2  # micro-batches per replica: 1F1B at PP=2 needs at least 2


def compare_expert_pipeline(name: str, config_kwargs: dict, groups, parallel_config, seed: int = 0,
                            batch: int = 2, n_micro: int = N_MICRO) -> ParityReport:
    """PP=2 x DP=2 with EP=2 (x TP=2 in a world of 8): each stage's MoE layer dispatches over the 2
    replicas of that stage, its experts whole on each TP rank (the TP ranks splitting the tokens) or
    TP-split (expert_tensor_parallel_size).
    Replica d pipelines its n_micro micro-batches (parallel_config's schedule; N_MICRO for 1F1B, 2 x PP
    for the V shapes); global micro-batch i is every replica's
    i-th rows. The reference runs each global micro-batch in one forward (load-balancing statistics
    of the whole micro-batch, capacity per replica's row block) and accumulates the mean. Compared
    as compare_expert_parallel (EP_TOLERANCES): the logged loss (every stage's aux losses in it),
    every gradient after the engine's reduction with the experts gathered over EP, the clipping
    norm, tokens per expert of the last micro-batch, the weights after one AdamW step (exact), and
    what a checkpoint writes (_checkpoint_errors). Gradients and weights are gathered over TP, then
    over EP."""
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.model.moe import MoELayer, collect_tokens_per_expert
    from forge_dist.parallel.expert import apply_expert_parallel
    from forge_dist.parallel.expert.state import gather_experts
    from forge_dist.parallel.pipeline import build_pipeline
    from forge_dist.parallel.pipeline.grads import distinct_params
    from forge_dist.train.pipeline_engine import PipelineEngine

    cfg = ModelConfig(**config_kwargs)
    parallel_config.validate(cfg, groups.topology.world_size)
    dp, d = groups.dp.size, groups.coord.dp
    ref = reference_moe_model(cfg, seed)
    model, stepped = copy.deepcopy(ref), copy.deepcopy(ref)
    splits = groups.tp.size if parallel_config.expert_tensor_parallel_size == 1 else 1  # TP ranks split tokens
    for m in ref.modules():
        if isinstance(m, MoELayer):
            m.capacity_groups = dp * splits
    apply_expert_parallel(model, groups, parallel_config)  # as shard_model, before the stages are cut

    errors: Dict[str, float] = {}
    if cfg.moe_capacity_factor is None:
        errors["per-token"] = _per_token_error(model, ref, groups, cfg, batch, seed)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (n_micro, dp * batch, cfg.block_size)
    xs, ys = torch.randint(0, cfg.vocab_size, shape, generator=g), torch.randint(0, cfg.vocab_size, shape, generator=g)
    ref_loss = 0.0
    for i in range(n_micro):
        loss = ref(xs[i], ys[i])[1]
        (loss / n_micro).backward()
        ref_loss += loss.item() / n_micro
    dropped = sum(float(m.last_dropped_tokens) for m in ref.modules() if isinstance(m, MoELayer))
    ref_counts = collect_tokens_per_expert(ref)  # the last global micro-batch's
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    ref_norm = torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]).norm()

    layout, runner = build_pipeline(model, groups, parallel_config, n_micro, "cpu", batch)
    engine = PipelineEngine(layout, runner, _adamw(distinct_params(layout)), "cpu", "float32", 0.0, groups,
                            parallel_config)
    rows = slice(d * batch, (d + 1) * batch)
    loss = engine.forward_backward([(xs[i, rows], ys[i, rows]) for i in range(n_micro)])
    errors["loss"] = rel_error(groups.dp.all_reduce(loss.reshape(1))[0] / dp, torch.tensor(ref_loss))
    engine.sync_gradients()
    errors["grad norm"] = rel_error(engine.clip_grad_norm(1e9), ref_norm)
    grads: Dict[str, torch.Tensor] = {}
    for chunk in layout.chunks.values():
        for k, c in collect_tokens_per_expert(chunk).items():
            errors[f"records: {k}"] = rel_error(groups.dp.all_reduce(c.double()), ref_counts[k].double())
        own = _tp_full(chunk, groups, grads=True)
        grads.update(gather_experts({n: t for n, t in own.items() if t is not None}, chunk, groups))
        for n, p in chunk.named_parameters(remove_duplicate=False):  # no early return: collectives follow
            if p.grad is None and ref_params[n].grad is not None:
                errors[f"grad: {n} (none on its stage)"] = float("inf")
    for n, grad in grads.items():
        errors[f"grad: {n}"] = rel_error(grad, ref_params[n].grad, floor=1e-3 * ref_norm.item())
    own_stepped = dict(stepped.named_parameters(remove_duplicate=False))
    for n, grad in grads.items():
        own_stepped[n].grad = grad.clone()
    _adamw(stepped.parameters()).step()
    engine.optimizer.step()
    full = {}
    for chunk in layout.chunks.values():
        full.update(gather_experts(_tp_full(chunk, groups), chunk, groups))
    stepped_state = stepped.state_dict()
    for n, t in full.items():
        errors[f"step: {n}"] = rel_error(t, stepped_state[n])
    errors.update(_checkpoint_errors(engine, full, stepped_state))
    report = _report(name, errors)
    report.worst["dropped"] = dropped
    return report


def _tp_full(chunk, groups, grads: bool = False) -> dict:
    """This rank's state (or gradients) of a stage, gathered over TP when TP > 1."""
    from forge_dist.parallel.tensor.metadata import gather_full_state_dict

    if groups.tp.size > 1:
        return gather_full_state_dict(chunk, groups, grads=grads)
    if grads:
        return {n: p.grad for n, p in chunk.named_parameters(remove_duplicate=False)}
    return chunk.state_dict()


def _checkpoint_errors(engine, stage_state: dict, one_process: dict) -> Dict[str, float]:
    """What a checkpoint writes (collective; checked on global rank 0): the weights under every
    one-process name, this stage's equal to the stepped ones, and an AdamW moment for every
    parameter of the one-process optimizer."""
    from forge_dist.parallel.pipeline.optim_state import full_optimizer_state
    from forge_dist.train.pipeline_engine import one_process_order

    weights = engine.full_state_dict()
    order = one_process_order(engine.model.config, 0.0, False)
    optim = full_optimizer_state(engine, order)
    if weights is None:
        return {}
    out = {"checkpoint: names": float(list(weights) != list(one_process))}
    out.update({f"checkpoint: {n}": rel_error(weights[n], t) for n, t in stage_state.items()})
    moments = [e.get("exp_avg") for e in optim["state"].values()]
    out["checkpoint: optimizer entries"] = float(len(moments) != sum(len(g) for g in order) or None in moments)
    return out

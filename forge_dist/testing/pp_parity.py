"""Compare a pipelined (and tensor/data-parallel) model with the single-process model.

One configuration: the plain GPT built from a seed (the reference) and a copy cut into this rank's
pipeline stages (``build_stages``), sharded over TP when tp > 1. The global batch is dp x n
micro-batches; the reference accumulates all of them in one process (mean of the micro-batch
losses, as LocalEngine), data-parallel replica d pipelines micro-batches d*n .. d*n+n-1 through
the schedule, then the engine's gradient steps run (scale, TP sync, pipeline copies summed, DP
average, clip). Compared (relative errors, TOLERANCES of forge_dist.testing.parity):

  loss         the logged loss (micro-batch mean, with every stage's MoE auxiliary losses),
               averaged over data-parallel replicas as the trainer's ctx.mean does
  grad         every gradient of this rank's stages, gathered over TP, against the reference's
  grad norm    the clipping norm over PP x TP against the reference's global norm
  init         the stages are cut from a GPT built on the meta device and only this rank's are
               materialised (pipeline/materialize.py): each local value exact against the
               reference's, and no drawn parameter of another rank's stages given a value
  step         the weights after one AdamW step (this rank's optimizer on its shards) against the
               full model stepped with the gathered gradients: exact, AdamW is elementwise
  ref step     the same weights against the reference stepped with its own gradients
  ddp          at DP > 1, every chunk of this rank runs in torch's DDP (split-backward schedules too)
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from forge_dist.testing.parity import ParityReport, rel_error

# ref step: AdamW's 1/(|g| + eps) magnifies the gradients' rounding gap on elements whose gradient
# is near eps (TP's other summation order: up to ~2e-4 in fp32); "step" is the exact check
TOL = {"init": 0.0, "opt state": 0.0, "resume": 0.0, "loss": 1e-6, "grad": 1e-5, "grad norm": 1e-5, "step": 0.0,
       "ref step": 1e-3, "ddp": 0.0}
B = 2  # rows per micro-batch


def _batches(cfg, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
        y = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
        y[0, :2] = -1
        out.append((x, y))
    return out


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)


def compare_pipeline(name: str, config_kwargs: dict, groups, schedule: str, virtual=None, n_micro: int = 4,
                     seed: int = 0, sequence_parallel: bool = False, layers=None, zero: bool = False) -> ParityReport:
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.pipeline import build_pipeline
    from forge_dist.parallel.pipeline.grads import distinct_params
    from forge_dist.parallel.tensor.metadata import gather_full_state_dict
    from forge_dist.train.pipeline_engine import PipelineEngine

    topo = groups.topology
    cfg = ModelConfig(**config_kwargs)
    pcfg = ParallelConfig(tensor_parallel_size=topo.tp, pipeline_parallel_size=topo.pp,
                          sequence_parallel=sequence_parallel, pipeline_schedule=schedule,
                          virtual_pipeline_size=virtual, pipeline_layers=layers)
    torch.manual_seed(seed)
    model = GPT(cfg, defer_init=True).train()  # every layer on meta: the pipeline fills only its stages
    torch.manual_seed(seed)
    ref = GPT(cfg).train()
    stepped = copy.deepcopy(ref)  # copied before any forward records state
    batches = _batches(cfg, topo.dp * n_micro, seed + 1)

    ref_loss = 0.0
    for x, y in batches:
        loss = ref(x, y)[1]
        (loss / len(batches)).backward()
        ref_loss += loss.item() / len(batches)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    ref_norm = torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]).norm()

    layout, runner = build_pipeline(model, groups, pcfg, n_micro, "cpu", B)
    init = _init_errors(model, layout, groups, ref)
    if isinstance(init, str):
        return ParityReport(name, "mismatch", init)
    params = distinct_params(layout)
    engine = PipelineEngine(layout, runner, _zero_adamw(params, groups.dp) if zero else _adamw(params), "cpu",
                            "float32", 0.0, groups, pcfg)
    d = groups.coord.dp
    loss = engine.forward_backward(batches[d * n_micro:(d + 1) * n_micro])
    loss = groups.dp.all_reduce(loss.reshape(1))[0] / groups.dp.size  # the trainer's mean over replicas
    engine.sync_gradients()
    norm = engine.clip_grad_norm(1e9)

    errors: Dict[str, float] = {"loss": abs(float(loss) - ref_loss) / abs(ref_loss),
                                "grad norm": rel_error(norm, ref_norm), **init}
    if groups.dp.size > 1:  # every schedule's chunks average over DP in torch's DDP (these models: none all-shared)
        errors["ddp"] = float(not all(runner.ddp.values()))
    grads, full_before = {}, {}
    for chunk in layout.chunks.values():
        grads.update(gather_full_state_dict(chunk, groups, grads=True))
    for n, g in grads.items():
        r = ref_params[n].grad
        if (g is None) != (r is None):
            return ParityReport(name, "mismatch", f"{n}: gradient present on one side only")
        if g is not None:
            errors[f"grad: {n}"] = rel_error(g, r, floor=1e-3 * ref_norm.item())
    stepped_params = dict(stepped.named_parameters(remove_duplicate=False))
    for n, g in grads.items():
        stepped_params[n].grad = None if g is None else g.clone()
    stepped_opt = _adamw(stepped.parameters())
    stepped_opt.step()
    _adamw(ref.parameters()).step()
    engine.optimizer.step()
    for chunk in layout.chunks.values():
        full_before.update(gather_full_state_dict(chunk, groups))
    ref_state, stepped_state = ref.state_dict(), stepped.state_dict()
    if zero:
        checked = _zero_errors(engine, cfg, stepped_opt, groups)
        if isinstance(checked, str):
            return ParityReport(name, "mismatch", checked)
        errors.update(checked)
    for n, t in full_before.items():
        errors[f"step: {n}"] = rel_error(t, stepped_state[n])
        errors[f"ref step: {n}"] = rel_error(t, ref_state[n])
    del params
    worst: Dict[str, float] = {}
    for key, e in errors.items():
        c = key.split(":")[0]
        worst[c] = max(worst.get(c, 0.0), e)
    failed = {k: e for k, e in errors.items() if e > TOL[k.split(":")[0]]}
    if not failed:
        return ParityReport(name, "pass", "", worst)
    detail = "; ".join(f"{k}: {e:.3g} > {TOL[k.split(':')[0]]:g}"
                       for k, e in sorted(failed.items(), key=lambda kv: -kv[1])[:4])
    return ParityReport(name, "mismatch", detail, worst)


def _zero_adamw(params, dp_group):
    from forge_dist.parallel.zero import zero_optimizer

    return zero_optimizer([{"params": params}], dp_group, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)


def _zero_errors(engine, cfg, stepped_opt, groups):
    """ZeRO-1 (--zero_stage 1) after its step: each data-parallel replica holds a strict part of its
    stage's AdamW moments and the parts add up to the whole; the checkpoint's gathered state
    (pipeline/optim_state.py, what global rank 0 writes) holds every parameter of the model once
    under its one-process index, each equal to the one-process AdamW state exactly ("opt state");
    loading it into a fresh ZeRO optimizer gives every replica back exactly the part it had
    ("resume")."""
    import torch.distributed as dist

    from forge_dist.parallel.pipeline.optim_state import full_optimizer_state, load_optimizer_state
    from forge_dist.parallel.zero import local_state, zero_optimizer
    from forge_dist.train.pipeline_engine import one_process_order

    opt = engine.optimizer
    moments = ("exp_avg", "exp_avg_sq")
    mine = sum(v.numel() for st in local_state(opt).values() for k, v in st.items() if k in moments)
    whole = 2 * sum(p.numel() for p in engine.distinct if p.grad is not None)
    total = groups.dp.all_reduce(torch.tensor([float(mine)]))[0].item()
    problems = []  # reported after the collectives below, which every rank must reach
    if groups.dp.size > 1 and not 0 < mine < whole or total != whole:
        problems.append(f"ZeRO-1 state not partitioned: this replica holds {mine}, the replicas {total:.0f} of "
                        f"{whole} moments")
    out: Dict[str, float] = {}
    order = one_process_order(cfg, 0.1, False)
    box = [full_optimizer_state(engine, order)]  # the checkpoint's optimizer file, written by global rank 0
    dist.broadcast_object_list(box, src=0)
    full = box[0]["state"]
    ref = stepped_opt.state_dict()["state"]  # this rank's stages: the full model stepped with their gradients
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(ref))
    union = set().union(*every)
    if set(full) != union:
        problems.append(f"the gathered optimizer state lacks entries {sorted(union - set(full))[:6]} and has extra "
                        f"ones {sorted(set(full) - union)[:6]}")
    for i, entry in ref.items():
        for k in moments:
            out[f"opt state: {k} {i}"] = rel_error(full[i][k], entry[k]) if i in full else float("inf")
    before = {p: {k: v.clone() for k, v in st.items()} for p, st in local_state(opt).items()}
    engine.optimizer = zero_optimizer([{"params": list(engine.distinct)}], groups.dp, lr=1e-2, betas=(0.9, 0.99),
                                      weight_decay=0.1)
    try:
        load_optimizer_state(engine, box[0], order, "the gathered state")
        after = local_state(engine.optimizer)
        if set(map(id, after)) != set(map(id, before)):
            problems.append("after loading the gathered state, this replica holds another part of the optimizer state")
        for j, (p, st) in enumerate(before.items()):
            for k in moments:
                out[f"resume: {k} {j}"] = rel_error(after[p][k], st[k]) if p in after else float("inf")
    finally:
        engine.optimizer = opt
    return "; ".join(problems) if problems else out


def _init_errors(model, layout, groups, ref):
    """The stages built from the meta device against the one-process model: every local value
    (gathered over TP) exact, and every drawn parameter of the other stages still on meta (never
    materialised). A string names the first layer materialised by a rank that does not run it."""
    from forge_dist.parallel.tensor.metadata import gather_full_state_dict

    owned = set(layout.local_params())
    for n, p in model.named_parameters():
        if n not in owned and n in model.init_rules and not p.is_meta:
            return f"{n} belongs to another pipeline rank but was materialised here"
    ref_state = ref.state_dict()
    out = {}
    for chunk in layout.chunks.values():
        for n, t in gather_full_state_dict(chunk, groups).items():
            out[f"init: {n}"] = rel_error(t, ref_state[n])
    return out


def run_pp_matrix(rank: int, world_size: int, runs) -> List[tuple]:
    """runs = [(pp, tp, schedule, virtual, case name, config, n_micro[, options])]: rows (the run's
    key, status, detail, worst); options are compare_pipeline's keywords ({"zero": True}: ZeRO-1,
    keyed as "<case>+zero1"; {"sequence_parallel": True}: "<case>+sp"), or {"ep": E, "etp": 1 or tp}:
    expert parallelism inside the stages (ep_parity.compare_expert_pipeline, a MoE config; "<case>+epE",
    with "sequence_parallel" too: "<case>+epE+sp").
    Process groups are built once per (pp, tp) layout."""
    from forge_dist.errors import ConfigError
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology

    layouts: Dict[tuple, object] = {}
    out = []
    for pp, tp, schedule, virtual, name, config, n_micro, *options in runs:
        opts = options[0] if options else {}
        if "ep" in opts:
            out.append(_expert_run(pp, tp, schedule, name, config, n_micro, opts, world_size, layouts))
            continue
        if (pp, tp) not in layouts:
            layouts[(pp, tp)] = ProcessGroups.build(Topology(world_size, tp=tp, pp=pp))
        key = (pp, tp, world_size // (pp * tp), schedule,
               name + ("+zero1" if opts.get("zero") else "") + ("+sp" if opts.get("sequence_parallel") else ""))
        try:
            r = compare_pipeline(name, config, layouts[(pp, tp)], schedule, virtual, n_micro, **opts)
        except ConfigError as e:
            r = ParityReport(name, "config", str(e))
        out.append((key, r.status, r.detail, r.worst))
    return out


def _expert_run(pp: int, tp: int, schedule: str, name: str, config: dict, n_micro: int, opts: dict,
                world_size: int, layouts: dict) -> tuple:
    """Expert parallelism inside the stages with TP (the EP groups carved out of DP), against one
    process: forge_dist.testing.ep_parity.compare_expert_pipeline (its EP_TOLERANCES)."""
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.errors import ConfigError
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.testing.ep_parity import compare_expert_pipeline

    ep, etp, sp = opts["ep"], opts.get("etp", tp), bool(opts.get("sequence_parallel"))
    pc = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep,
                        expert_tensor_parallel_size=etp, pipeline_schedule=schedule, sequence_parallel=sp)
    key = (pp, tp, world_size // (pp * tp), schedule, f"{name}+ep{ep}" + ("+sp" if sp else ""))
    try:
        if (pp, tp, "ep", ep) not in layouts:
            layouts[(pp, tp, "ep", ep)] = ProcessGroups.build(pc.topology(world_size))
        r = compare_expert_pipeline(name, config, layouts[(pp, tp, "ep", ep)], pc, n_micro=n_micro)
    except ConfigError as e:
        r = ParityReport(name, "config", str(e))
    return key, r.status, r.detail, r.worst

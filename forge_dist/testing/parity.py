"""Compare a tensor-parallel model with the single-process model, on one rank of a TP group.

For one configuration: build the plain GPT (fp32, or float64 for ill-conditioned cases), copy it,
parallelize the copy, run the same batch through both (targets include ignored positions, -1),
each forward preceded by the same seed (so variants that draw random numbers in their forward,
krmsnorm's random features, noisy MoE routing, stochastic rounding, draw the same ones), and
compare, each against its own tolerance (TOLERANCES, relative: ||tp - ref|| / ||ref||):

  loss             the mean cross-entropy (plus MoE auxiliary losses)
  grad             every gradient, gathered back to its logical shape with the shard metadata
                   after tp_grad_sync; a gradient that is mathematically zero (a key bias under
                   softmax) is rounding noise, so norms are floored at 1e-3 of the global norm
  grad norm        tp_grad_norm against the norm of the reference gradients
  records          what a forward records besides its output: MoE tokens per expert, the
                   steering vector's recorded mean
  step             the weights after one step of the project's optimizer (train/optim.py's
                   build_optimizer: AdamW with its parameter groups, decay split on), against the
                   full model stepped by the same builder with the gathered TP gradients: exact,
                   since AdamW is elementwise
  reference step   the same TP weights against the reference model stepped by the builder with
                   its own gradients, on the elements whose reference gradient exceeds 1e-6 of the
                   global gradient norm: below that (a key bias under softmax, whose gradient is
                   zero but for rounding) AdamW's g / (|g| + eps) turns fp32 noise into a whole
                   step of either sign; those elements are covered by the exact "step" check
  sampling logits  the last-position logits without targets (vocab gather, padding cut)
  decoding logits  KV-cached decoding (prefill, then single tokens), without sequence parallelism

``run_matrix`` runs many configurations in one spawned world (tests/dist/test_tp_parity.py and
tools/gen_support_matrix.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from forge_dist.errors import ConfigError


STEP_GRAD_FLOOR = 1e-6  # of the global gradient norm: see "reference step"
TOLERANCES: Dict[str, float] = {"loss": 1e-6, "grad": 1e-5, "grad norm": 1e-5, "records": 1e-6, "step": 0.0,
                                "reference step": 1e-5,  # worst measured over every TP=2 case: 6e-7
                                "sampling logits": 1e-5, "decoding logits": 1e-5}


@dataclass
class ParityReport:
    name: str
    status: str  # pass | mismatch | refused (no rule, or cannot be exact) | config (shapes do not divide)
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


def _seeded(seed: int, module, *args, **kwargs):
    """``module(*args, **kwargs)`` from a fixed generator state: both models draw the same numbers."""
    torch.manual_seed(seed)
    return module(*args, **kwargs)


def _decode_error(model, ref, x, n_layer: int, seed: int) -> float:
    """KV-cached decoding: a prefill of all but 3 tokens, then one token at a time."""
    from forge_dist.model.cache import KVCache

    caches = KVCache(n_layer), KVCache(n_layer)
    T = x.shape[1]
    worst = 0.0
    for lo, hi in ((0, T - 3), (T - 3, T - 2), (T - 2, T - 1), (T - 1, T)):
        got = _seeded(seed + hi, model, x[:, lo:hi], cache=caches[0])[0]
        worst = max(worst, rel_error(got, _seeded(seed + hi, ref, x[:, lo:hi], cache=caches[1])[0]))
    return worst


def _records(model) -> Dict[str, torch.Tensor]:
    """What the last forward recorded: MoE tokens per expert, the steering vector's mean."""
    from forge_dist.model.moe import collect_tokens_per_expert

    out = {f"tokens per expert: {k}": v.float() for k, v in collect_tokens_per_expert(model).items()}
    steering = getattr(model, "steering", None)
    if steering is not None and steering.obtain_at is not None:
        out["steering mean"] = steering.obtained()
    return out


def _optimizer(model):
    """The project's optimizer builder (what forge-train steps with), at a rate where one step shows."""
    from forge_dist.train.optim import build_optimizer
    from forge_dist.train.options import TrainConfig

    cfg = TrainConfig(device="cpu", learning_rate=1e-2, adamw_weight_decay=0.1, weight_decay_split=True)
    return build_optimizer(model, cfg, "cpu")


def compare_with_single(name: str, config_kwargs: dict, groups, parallel_config, seed: int = 0,
                        train: bool = True, dtype: torch.dtype = torch.float32) -> ParityReport:
    """``train=False`` compares in eval mode (variants that are random in training, like rrelu);
    ``dtype=torch.float64`` for configurations whose fp32 model is itself ill-conditioned."""
    from forge_dist.config.model_config import ModelConfig
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
    ref = GPT(cfg).to(dtype).train(train)
    model = copy.deepcopy(ref)
    try:
        parallelize(model, groups, parallel_config)
    except NoShardingRuleError as e:
        return ParityReport(name, "refused", str(e))
    except ConfigError as e:  # a shape a rule must split does not divide
        return ParityReport(name, "config", str(e))
    x, y = _batch(cfg.vocab_size, cfg.block_size, seed + 1)

    errors: Dict[str, float] = {}  # "category: tensor" -> relative error
    ref_loss = _seeded(seed + 2, ref, x, y)[1]
    loss = _seeded(seed + 2, model, x, y)[1]
    errors["loss"] = rel_error(loss, ref_loss)
    ref_records, records = _records(ref), _records(model)
    if set(records) != set(ref_records):
        return ParityReport(name, "mismatch", f"records differ: {sorted(set(records) ^ set(ref_records))}")
    for k, v in records.items():
        errors[f"records: {k}"] = rel_error(v, ref_records[k])
    ref_loss.backward()
    loss.backward()
    tp_grad_sync(model, groups)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    grads = gather_full_state_dict(model, groups, grads=True)
    if set(grads) != set(ref_params):
        return ParityReport(name, "mismatch", f"parameter names differ: {sorted(set(grads) ^ set(ref_params))}")
    ref_norm = torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]).norm()
    for n, g in grads.items():
        if (g is None) != (ref_params[n].grad is None):
            return ParityReport(name, "mismatch", f"{n}: gradient present on one side only")
        if g is not None:
            errors[f"grad: {n}"] = rel_error(g, ref_params[n].grad, floor=1e-3 * ref_norm.item())
    errors["grad norm"] = rel_error(tp_grad_norm(model, groups), ref_norm)
    with torch.no_grad():
        errors["sampling logits"] = rel_error(_seeded(seed + 3, model, x)[0], _seeded(seed + 3, ref, x)[0])
        if not (parallel_config.sequence_parallel and groups.tp.size > 1):  # one token cannot be split
            errors["decoding logits"] = _decode_error(model, ref, x, cfg.n_layer, seed + 4)

    stepped = copy.deepcopy(ref)  # the full model stepped with the gathered TP gradients
    for n, p in stepped.named_parameters(remove_duplicate=False):
        p.grad = None if grads[n] is None else grads[n].clone()
    ref_grads = {n: p.grad.detach().clone() for n, p in ref_params.items() if p.grad is not None}
    for m in (stepped, model, ref):  # ref with its own gradients
        _optimizer(m).step()
    full = gather_full_state_dict(model, groups)
    ref_state = ref.state_dict()
    for n, t in stepped.state_dict().items():
        errors[f"step: {n}"] = rel_error(full[n], t)
        if n in ref_grads:
            keep = ref_grads[n].abs() > STEP_GRAD_FLOOR * ref_norm
            if keep.any():
                errors[f"reference step: {n}"] = rel_error(full[n][keep], ref_state[n][keep])
    worst: Dict[str, float] = {}
    for key, e in errors.items():
        category = key.split(":")[0]
        worst[category] = max(worst.get(category, 0.0), e)
    failed = {k: e for k, e in errors.items() if e > TOLERANCES[k.split(":")[0]]}
    if not failed:
        return ParityReport(name, "pass", "", worst)
    detail = "; ".join(f"{k}: {e:.3g} > {TOLERANCES[k.split(':')[0]]:g}"
                       for k, e in sorted(failed.items(), key=lambda kv: -kv[1])[:5])
    return ParityReport(name, "mismatch", detail, worst)


def select_cases(selection) -> List[Tuple[str, dict]]:
    """"all" (core and per-variant cases), "core", or a tuple of case names."""
    from forge_dist.testing.tp_cases import all_cases, core_cases

    if selection == "core":
        return list(core_cases())
    cases = list(all_cases())
    if selection == "all":
        return cases
    missing = set(selection) - {n for n, _ in cases}
    if missing:
        raise KeyError(f"unknown parity cases {sorted(missing)}")
    return [c for c in cases if c[0] in selection]


def run_matrix(rank: int, world_size: int, runs) -> List[tuple]:
    """On every rank of a spawned world: runs = [(tp, selection, sequence_parallel modes)] ->
    rows (tp, sequence_parallel, name, status, detail, worst errors)."""
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology
    from forge_dist.testing.tp_cases import EVAL_MODE_CASES, compare_in_float64

    out = []
    for tp, selection, sp_modes in runs:
        groups = ProcessGroups.build(Topology(world_size, tp=tp))
        cases = select_cases(selection)
        for sp in sp_modes:
            pc = ParallelConfig(tensor_parallel_size=tp, sequence_parallel=sp)
            for name, kwargs in cases:
                r = compare_with_single(name, kwargs, groups, pc, train=name not in EVAL_MODE_CASES,
                                        dtype=torch.float64 if compare_in_float64(name, kwargs) else torch.float32)
                out.append((tp, sp, name, r.status, r.detail, r.worst))
    return out


COMM_KINDS = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS"}
COMM_PHASES = ("forward", "backward", "grad_sync")


def comm_counts(config_kwargs: dict, groups, parallel_config, seed: int = 0) -> Dict[str, Dict[str, int]]:
    """Collectives of one training step of the parallelized model (forward with loss, backward,
    tp_grad_sync): {phase: {kind: count}}, kinds as COMM_KINDS' abbreviations."""
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.metadata import tp_grad_sync

    cfg = ModelConfig(**config_kwargs)
    torch.manual_seed(seed)
    model = parallelize(GPT(cfg), groups, parallel_config)
    x, y = _batch(cfg.vocab_size, cfg.block_size, seed + 1)
    counters = {}
    with groups.count_collectives() as counters["forward"]:
        loss = _seeded(seed + 2, model, x, y)[1]
    with groups.count_collectives() as counters["backward"]:
        loss.backward()
    with groups.count_collectives() as counters["grad_sync"]:
        tp_grad_sync(model, groups)
    return {phase: {short: c.count(kind=kind) for kind, short in COMM_KINDS.items() if c.count(kind=kind)}
            for phase, c in counters.items()}


# --- the support matrix (docs/support_matrix.md, written by tools/gen_support_matrix.py) ---------
MODES = ((2, False), (2, True), (4, False), (4, True))  # (tp, sequence_parallel)
MODE_NAMES = {(2, False): "TP2", (2, True): "TP2+SP", (4, False): "TP4", (4, True): "TP4+SP"}
STATUS_WORDS = {"pass": "pass", "refused": "refused", "config": "n/a", "mismatch": "MISMATCH"}
ONCE = "†"  # marks a cell CI does not measure: tools/gen_support_matrix.py measured it once


def measured_by_ci(name: str, mode: Tuple[int, bool]) -> bool:
    """tests/dist/test_tp_parity.py runs every case at TP=2 and tp_cases.TP4_CASES at TP=4."""
    from forge_dist.testing.tp_cases import TP4_CASES

    return mode[0] == 2 or name in TP4_CASES


def _counts_text(counts: Dict[str, int]) -> str:
    return " ".join(f"{n} {k}" for k, n in counts.items()) or "0"


def render_support_matrix(rows, comm: Dict[str, Dict[bool, dict]], header: str, commit: str = "unknown") -> str:
    """Markdown of parity rows (run_matrix) over MODES and of the TP=2 collectives (comm_counts
    per case and sequence_parallel). Cells CI does not measure carry ONCE and name ``commit``."""
    from forge_dist.testing.tp_cases import EVAL_MODE_CASES, all_cases, compare_in_float64

    status = {(name, tp, sp): (st, detail, worst) for tp, sp, name, st, detail, worst in rows}
    lines = [header, "", "| mode | pass | refused | n/a | mismatch |", "|---|---|---|---|---|"]
    for mode in MODES:
        got = [v[0] for k, v in status.items() if (k[1], k[2]) == mode]
        lines.append(f"| {MODE_NAMES[mode]} | " + " | ".join(str(got.count(s)) for s in STATUS_WORDS) + " |")
    lines += ["", f"{ONCE} measured once by `tools/gen_support_matrix.py` at commit {commit}, not by CI: "
              "tests/dist/test_tp_parity.py runs every case at TP=2 and `tp_cases.TP4_CASES` at TP=4 "
              "(the TP4 counts above include the cells measured once)."]
    lines += ["", "| case | " + " | ".join(MODE_NAMES[m] for m in MODES) + " | compared | worst grad error |",
              "|---" * (len(MODES) + 3) + "|"]
    reasons = []
    for name, kwargs in all_cases():
        cells = [status.get((name,) + m) for m in MODES]
        words = [(STATUS_WORDS[c[0]] + ("" if measured_by_ci(name, m) else ONCE)) if c else "-"
                 for m, c in zip(MODES, cells)]
        how = ("fp64" if compare_in_float64(name, kwargs) else "fp32") + (", eval" if name in EVAL_MODE_CASES else "")
        worst = max((c[2].get("grad", 0.0) for c in cells if c), default=0.0)
        lines.append(f"| {name} | " + " | ".join(words) + f" | {how} | {worst:.1e} |")
        for why in dict.fromkeys(c[1] for c in cells if c and c[0] != "pass"):
            modes = ", ".join(MODE_NAMES[m] for m, c in zip(MODES, cells) if c and c[1] == why)
            reasons.append(f"- `{name}` ({modes}): {why}")
    lines += ["", "## Refusals and shapes that do not split", ""] + (reasons or ["(none)"])
    lines += ["", "## Collectives per training step at TP=2", "",
              "Whole model (2 layers): forward with the loss, backward, tp_grad_sync. AR all-reduce, AG all-gather, "
              "RS reduce-scatter.", "",
              "| case | forward | backward | grad sync | forward (SP) | backward (SP) | grad sync (SP) |",
              "|---|---|---|---|---|---|---|"]
    for name, per_sp in comm.items():
        cells = [_counts_text(per_sp[sp][phase]) for sp in (False, True) for phase in COMM_PHASES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_support_matrix(text: str) -> Dict[Tuple[str, int, bool], str]:
    """(case, tp, sequence_parallel) -> status word, from a rendered support matrix."""
    out = {}
    heads = [MODE_NAMES[m] for m in MODES]
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:1] == ["case"] and cells[1:1 + len(MODES)] == heads:
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table and not cells[0].startswith("---"):
            for mode, word in zip(MODES, (c.rstrip(ONCE) for c in cells[1:1 + len(MODES)])):
                if word != "-":
                    out[(cells[0],) + mode] = word
    return out

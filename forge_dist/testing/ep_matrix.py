"""The expert-parallel section of docs/support_matrix.md: the layouts of a world of 4, the run of
every case at each (run_ep_matrix, comparisons in forge_dist.testing.ep_parity), the section
rendered from its rows and read back by tests/dist/test_expert_parallel.py."""
from __future__ import annotations

from typing import Dict, List, Optional

from forge_dist.testing.ep_parity import compare_expert_parallel, compare_expert_pipeline, ep_cases, ep_model_kwargs

EP_LAYOUTS = {  # name -> ParallelConfig options, in a world of 4
    "EP4": dict(expert_parallel_size=4),
    "EP2xDP2": dict(expert_parallel_size=2),
    "EP2xTP2": dict(expert_parallel_size=2, tensor_parallel_size=2),
    "EP2xTP2_ETP1": dict(expert_parallel_size=2, tensor_parallel_size=2, expert_tensor_parallel_size=1),
    "EP2xTP2_SP": dict(expert_parallel_size=2, tensor_parallel_size=2, sequence_parallel=True),
    "EP2xTP2_ETP1_SP": dict(expert_parallel_size=2, tensor_parallel_size=2, expert_tensor_parallel_size=1,
                            sequence_parallel=True),  # dropless only: capacity per sequence shard is refused
    "DP4": dict(),
    "EP2xPP2": dict(expert_parallel_size=2, pipeline_parallel_size=2),  # inside each stage
}


def run_ep_matrix(rank: int, world_size: int, layouts: Optional[List[str]] = None,
                  cases: Optional[List[str]] = None) -> List[tuple]:
    """On every rank of a spawned world: rows (layout, case, status, detail, worst errors)."""
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.groups import ProcessGroups

    out = []
    for layout in layouts or list(EP_LAYOUTS):
        pc = ParallelConfig(**EP_LAYOUTS[layout])
        groups = ProcessGroups.build(pc.topology(world_size))
        compare = compare_expert_pipeline if pc.pipeline_parallel_size > 1 else compare_expert_parallel
        for case in cases or ep_cases(layout):
            r = compare(f"{layout} {case}", ep_model_kwargs(case), groups, pc)
            out.append((layout, case, r.status, r.detail, r.worst))
    return out


EP_SECTION = "## Expert parallelism"


def render_ep_section(rows) -> str:
    """Markdown of run_ep_matrix rows: one row per case, one column per EP layout."""
    status = {(case, layout): (st, worst) for layout, case, st, _, worst in rows}
    cases = list(dict.fromkeys(case for _, case, *_ in rows))
    lines = [EP_SECTION, "",
             "Generated with the rest of this file; checked by `tests/dist/test_expert_parallel.py` "
             "(`forge_dist.testing.ep_parity`). A world of 4 against one process with the global batch: "
             "loss 1e-6, every gradient 1e-5 after the engine's reduction, grad norm 1e-5, tokens per expert "
             "exact, AdamW step exact, the same step under `--zero_stage 1` exact (every layout but EP2xPP2: "
             "dense moments sharded over dp, the experts over expert_dp), the placed layer against the "
             "per-token loop 1e-5 (dropless). "
             "Routers with aux and z losses; `expert=<variant>`: that MLP variant as every expert, top-2. "
             "EP2xTP2_ETP1: experts whole on each TP rank (`--expert_tensor_parallel_size 1`), the TP ranks "
             "splitting the tokens; _SP: with sequence parallelism (ETP1: dropless only); EP2xTP2_SP: "
             "with sequence parallelism; EP2xPP2: inside each of 2 pipeline stages (1F1B, 2 micro-batches, "
             "every stage's aux losses in the objective); DP4: no "
             "expert parallelism, load-balancing statistics of the global batch. `-`: not run.", "",
             "| case | " + " | ".join(EP_LAYOUTS) + " | worst grad error |", "|---" * (len(EP_LAYOUTS) + 2) + "|"]
    for case in cases:
        cells = [status.get((case, layout)) for layout in EP_LAYOUTS]
        worst = max((c[1].get("grad", 0.0) for c in cells if c), default=0.0)
        words = [c[0] if c else "-" for c in cells]
        lines.append(f"| {case} | " + " | ".join(words) + f" | {worst:.1e} |")
    return "\n".join(lines) + "\n"


def read_ep_section(text: str) -> Dict[tuple, str]:
    """(case, layout) -> status word, from a rendered support matrix ({} without the section)."""
    if EP_SECTION not in text:
        return {}
    out = {}
    for line in text.split(EP_SECTION, 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("case",) or cells[0].startswith("---"):
            continue
        for layout, word in zip(EP_LAYOUTS, cells[1:]):
            if word != "-":
                out[(cells[0], layout)] = word
    return out

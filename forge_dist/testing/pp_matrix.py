"""The pipeline-parallel section of docs/support_matrix.md, rendered from run_pp_matrix rows
(forge_dist.testing.pp_parity) and read back by tests/dist/test_pp_parity.py, which fails when a
status it measures differs from the file (as the TP and EP sections are checked)."""
from __future__ import annotations

from typing import Dict, List

PP_SECTION = "## Pipeline parallelism"


def column(key) -> str:
    """The layout column of a run key (pp, tp, dp, schedule, case): PP2xTP2, PP2xDP2 ZeRO-1, ..."""
    pp, tp, dp, _, case = key
    flags = case.split("+")[1:]
    name = f"PP{pp}" + (f"xTP{tp}" if tp > 1 else "") + (f"xDP{dp}" if dp > 1 else "")
    ep = [f[2:] for f in flags if f.startswith("ep")]
    return (name + (" SP" if "sp" in flags else "") + (" ZeRO-1" if "zero1" in flags else "")
            + (f" EP{ep[0]}" if ep else ""))


def row(key) -> str:
    """The row of a run key: the case (model or variant) and its schedule."""
    return f"{key[4].split('+')[0]} / {key[3]}"


def statuses(per_rank) -> Dict[tuple, tuple]:
    """(row, column) -> (status, worst grad error) over every rank of a spawned run_pp_matrix:
    pass only where every rank passed."""
    out: Dict[tuple, tuple] = {}
    for rows in per_rank:
        for key, status, _, worst in rows:
            cell = (row(key), column(key))
            old = out.get(cell, ("pass", 0.0))
            grad = max(old[1], (worst or {}).get("grad", 0.0))
            out[cell] = (old[0] if old[0] != "pass" else status, grad)
    return out


def _order(columns: List[str]) -> List[str]:
    return sorted(columns, key=lambda c: (c.count("x"), int(c[2]), "TP" not in c, "ZeRO" in c, c))


def render_pp_section(cells: Dict[tuple, tuple]) -> str:
    rows = list(dict.fromkeys(r for r, _ in sorted(cells, key=lambda rc: (rc[0].count("/"), rc[0]))))
    columns = _order(list({c for _, c in cells}))
    lines = [PP_SECTION, "",
             "Generated with the rest of this file (`python tools/gen_support_matrix.py --pipeline-only` "
             "reruns this section); checked by `tests/dist/test_pp_parity.py` (`forge_dist.testing.pp_parity`). "
             "Each run against one process with the same seed and micro-batches (fp32): the stages cut from a "
             "GPT built on the meta device, each rank's initial values exact and no other rank's layer "
             "materialised; loss 1e-6, every gradient of every stage (gathered over TP) 1e-5, the clipping "
             "norm over PP x TP 1e-5, the weights after one AdamW step exact; with ZeRO-1 also each replica "
             "holding a strict part of the AdamW state and the gathered (checkpoint) state equal to the "
             "one-process AdamW state exactly. Rows: case / schedule (`default`, `variant_mix` and "
             "`checkpointed` (the default model with --use_gradient_checkpointing): "
             "forge_dist/testing/pp_cases.py; the others: tp_cases.py configurations whose modules cross the "
             "stage boundary). PPxDP: torch's DDP reducer per stage, every schedule (split-backward ones: "
             "schedule.ForgeStage fires its hooks at the last weight pass). The 8-rank PP2xTP2xDP2 column is "
             "measured by the 8-rank test; its EP2 columns: expert parallelism inside the stages (EP=2 carved "
             "out of DP=2, `moe_<router>_etp<1|2>`: forge_dist.testing.ep_parity's MoE model, experts whole on "
             "each TP rank or TP-split, SP: 4 layers with sequence parallelism; also tokens per expert exact "
             "and the checkpoint's gathered weights and AdamW state). "
             "`-`: not run. Refused before launch by name: --zero_stage with expert parallelism, dtype float16, "
             "--compile.", "",
             "| case / schedule | " + " | ".join(columns) + " | worst grad error |",
             "|---" * (len(columns) + 2) + "|"]
    for r in rows:
        got = [cells.get((r, c)) for c in columns]
        worst = max((g[1] for g in got if g), default=0.0)
        lines.append(f"| {r} | " + " | ".join(g[0] if g else "-" for g in got) + f" | {worst:.1e} |")
    return "\n".join(lines) + "\n"


def read_pp_section(text: str) -> Dict[tuple, str]:
    """(row, column) -> status word, from a rendered support matrix ({} without the section)."""
    if PP_SECTION not in text:
        return {}
    body = text.split(PP_SECTION, 1)[1].split("\n## ", 1)[0]
    out, columns = {}, None
    for line in body.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "case / schedule":
            columns = cells[1:-1]
        elif columns and not cells[0].startswith("---"):
            for c, word in zip(columns, cells[1:-1]):
                if word != "-":
                    out[(cells[0], c)] = word
    return out


def replace_pp_section(text: str, section: str) -> str:
    """``text`` with its pipeline section replaced by ``section`` (inserted before the expert-
    parallel section, or at the end, when it has none)."""
    if PP_SECTION in text:
        head, rest = text.split(PP_SECTION, 1)
        tail = rest.split("\n## ", 1)
        return head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    marker = "## Expert parallelism"
    if marker in text:
        head, rest = text.split(marker, 1)
        return head + section + "\n" + marker + rest
    return text.rstrip("\n") + "\n\n" + section

"""The parity matrix: tensor-parallel model == single-process model, same seed and batch.

Per configuration (forge_dist.testing.parity, tolerances in TOLERANCES there): loss 1e-6
relative, every gradient gathered to full shape 1e-5, global grad norm 1e-5, recorded statistics
1e-6, sampling and decoding logits 1e-5, weights after one AdamW step exact (0) against the full
model stepped with the gathered gradients; fp32, fp64 for quantizing and ill-conditioned cases
(tp_cases.compare_in_float64). Cases are data (forge_dist.testing.tp_cases): every case runs at
TP=2 with and without sequence parallelism in a world of 2; a representative subset
(tp_cases.TP4_CASES) at TP=4 and a few at TP=2 beside each other in a world of 4. No case may
mismatch; a core case must pass wherever its shapes divide; a variant or option may be refused
only with a NoShardingRuleError naming its module; and every status must equal the one in
docs/support_matrix.md (regenerate it with tools/gen_support_matrix.py).
"""
import os

import pytest

from forge_dist.testing.parity import MODE_NAMES, STATUS_WORDS, TOLERANCES, read_support_matrix, run_matrix
from forge_dist.testing.spawn import spawn
from forge_dist.testing.tp_cases import TP2_IN_WORLD4_CASES, TP4_CASES, core_cases

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MATRIX = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                      "support_matrix.md")
BOTH = (False, True)


def _check(per_rank):
    rows = per_rank[0]
    for r, other in enumerate(per_rank[1:], 1):
        assert [row[:4] for row in other] == [row[:4] for row in rows], f"rank {r} disagrees with rank 0"
    core = {name for name, _ in core_cases()}
    with open(MATRIX) as f:
        documented = read_support_matrix(f.read())
    worst = {k: 0.0 for k in TOLERANCES}
    problems, refused, stale = [], set(), []
    for tp, sp, name, status, detail, errs in rows:
        where = f"tp={tp} sp={sp} {name}"
        for k, v in errs.items():
            worst[k] = max(worst[k], v)
        if documented.get((name, tp, sp)) != STATUS_WORDS[status]:
            stale.append(f"{name} {MODE_NAMES[(tp, sp)]}: measured {STATUS_WORDS[status]}, documented "
                         f"{documented.get((name, tp, sp))}")
        if status == "refused" and name not in core and "transformer." in detail:
            refused.add(name)
        elif status not in ("pass", "config"):
            problems.append(f"{where}: {status}: {detail}")
    print(f"\nworst relative errors over {len(rows)} runs: " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    print(f"refused by parallelize: {', '.join(sorted(refused)) or 'none'}")
    assert not problems, "\n".join(problems)
    assert not stale, ("docs/support_matrix.md is out of date (python tools/gen_support_matrix.py):\n"
                       + "\n".join(stale))
    assert sum(row[3] == "pass" for row in rows) > len(rows) // 2
    return {(tp, sp, name): status for tp, sp, name, status, *_ in rows}


@pytest.mark.timeout(240)
def test_parity_tp2_every_case_with_and_without_sequence_parallel():
    per_rank = spawn(run_matrix, 2, [(2, "all", BOTH)], timeout=220, return_all=True)
    statuses = _check(per_rank)
    assert statuses[(2, True, "option=moe")] == "pass" and statuses[(2, False, "attention=co4")] == "pass"


@pytest.mark.timeout(300)
def test_parity_tp4_and_tp2_in_a_world_of_4():
    runs = [(4, TP4_CASES, BOTH), (2, TP2_IN_WORLD4_CASES, (False,))]  # tp=2: two TP groups side by side
    statuses = _check(spawn(run_matrix, 4, runs, timeout=280, return_all=True))
    assert statuses[(4, False, "layerlist_heads")] == "config"  # layer 1 has 2 heads: does not split over 4
    assert statuses[(4, True, "mqa_kv1")] == "pass" and statuses[(4, True, "option=quantize_wte")] == "pass"

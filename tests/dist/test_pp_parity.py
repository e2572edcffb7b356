"""Pipeline parity: pipelined == one process, same seed and micro-batches (fp32).

Per run (forge_dist.testing.pp_parity): the logged loss 1e-6 relative, every gradient of every
stage gathered over TP 1e-5, the clipping norm over PP x TP 1e-5, the weights after one AdamW
step exact against the full model stepped with the gathered gradients (and 1e-3 against the
reference's own step). The stages are cut from a GPT built on the meta device: each rank's values
equal the one-process model's exactly and no other rank's layer is materialised. Every schedule
(gpipe, 1f1b, interleaved_1f1b, interleaved_zero_bubble, zbv, dualpipev) on the default model and
on a variant mix with tied embeddings, cross-stage shared modules and MoE losses on several
stages, at PP=2 x TP=2, PP=2 x DP=2 (DDP per stage, and ZeRO-1) and PP=4 in one world of 4.
"""
import os

import pytest

from forge_dist.testing.pp_cases import (SPLIT_BACKWARD, checkpointing_runs, schedule_runs, variant_runs,
                                         world8_runs, zero_runs)
from forge_dist.testing.pp_matrix import read_pp_section, statuses
from forge_dist.testing.pp_memory import micro_batches_in_flight
from forge_dist.testing.pp_parity import run_pp_matrix
from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MATRIX = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                      "support_matrix.md")


def _documented(per_rank):
    """The statuses measured equal docs/support_matrix.md's pipeline section (each test checks its cells)."""
    measured = {cell: status for cell, (status, _) in statuses(per_rank).items()}
    with open(MATRIX, encoding="utf-8") as f:
        documented = read_pp_section(f.read())
    stale = {cell: (documented.get(cell), status) for cell, status in measured.items() if documented.get(cell) != status}
    assert not stale, f"docs/support_matrix.md is out of date (python tools/gen_support_matrix.py --pipeline-only): {stale}"


def _check(per_rank, expected_runs):
    problems, seen = [], set()
    for rank, rows in enumerate(per_rank):
        assert len(rows) == expected_runs, f"rank {rank} ran {len(rows)} of {expected_runs}"
        for key, status, detail, worst in rows:
            seen.add(key)
            if status != "pass":
                problems.append(f"rank {rank} {key}: {status}: {detail}")
    assert not problems, "\n".join(problems)
    return seen


@pytest.mark.timeout(400)
def test_every_schedule_pp2_tp2_pp2_dp2_pp4_in_a_world_of_4():
    """Also ZeRO-1 over each stage's replicas at PP=2 x DP=2: the weights after the step, each
    replica holding a strict part of the AdamW state, the gathered (checkpoint) state equal to the
    one-process AdamW state, and loading it back giving each replica its part (pp_parity._zero_errors).
    And --use_gradient_checkpointing under each split-backward schedule at PP=2 x DP=2 (DDP per stage:
    the recomputed blocks serve the input and the weight pass, DDP's hooks fire at the last one)."""
    runs = schedule_runs([(2, 2), (2, 1), (4, 1)]) + zero_runs() + checkpointing_runs()
    per_rank = spawn(run_pp_matrix, 4, runs, timeout=380, return_all=True)
    seen = _check(per_rank, len(runs))
    _documented(per_rank)
    assert (2, 2, 1, "dualpipev", "variant_mix") in seen and (4, 1, 1, "zbv", "default") in seen
    assert (2, 1, 2, "interleaved_zero_bubble", "variant_mix") in seen
    assert (2, 1, 2, "zbv", "variant_mix+zero1") in seen
    assert {(2, 1, 2, s, "checkpointed") for s in SPLIT_BACKWARD} <= seen


@pytest.mark.timeout(300)
def test_variants_across_two_stages_1f1b():
    """tp_cases configurations whose modules cross the stage boundary (tied, factorised and
    quantized tables, shared modules and FIRE, per-layer lists, steering, LSV, MoE losses) at PP=2."""
    runs = variant_runs()
    per_rank = spawn(run_pp_matrix, 2, runs, timeout=280, return_all=True)
    _check(per_rank, len(runs))
    _documented(per_rank)


@pytest.mark.timeout(350)
def test_pp2_tp2_dp2_in_a_world_of_8():
    """The three dimensions together, which no world of 4 holds: every rank has a pipeline peer, a
    tensor-parallel peer and a data-parallel replica, so the TP sums, the pipeline copies' sums (tied
    table, shared modules), the DP reduction (DDP per stage, every schedule) and
    ZeRO-1 over each stage's replicas all act in one step, with sequence parallelism in one run; and
    expert parallelism inside the stages (EP=2 carved out of DP=2), experts whole on each TP rank and
    TP-split, under 1F1B and, with sequence parallelism, dualpipev and interleaved zero-bubble
    (forge_dist.testing.ep_parity.compare_expert_pipeline)."""
    runs = world8_runs()
    per_rank = spawn(run_pp_matrix, 8, runs, timeout=330, return_all=True)
    seen = _check(per_rank, len(runs))
    assert (2, 2, 2, "dualpipev", "default+zero1+sp") in seen
    assert {(2, 2, 2, "1f1b", f"moe_top2_etp{e}+ep2") for e in (1, 2)} <= seen
    assert {(2, 2, 2, "dualpipev", "moe_top2_etp2+ep2+sp"), (2, 2, 2, "interleaved_zero_bubble",
                                                            "moe_top2_etp1+ep2+sp")} <= seen
    _documented(per_rank)


@pytest.mark.timeout(200)
def test_activation_memory_1f1b_holds_at_most_p_micro_batches_gpipe_all():
    """Saved-tensor hooks count the bytes each stage keeps for backward (forge_dist.testing.pp_memory):
    with P=4 stages and 8 micro-batches, every stage holds all 8 in flight under GPipe, and stage s
    holds P - s under 1F1B (its warm-up depth): P on the first stage, one on the last."""
    per_rank = spawn(micro_batches_in_flight, 4, timeout=180, return_all=True)
    for stage, held in enumerate(per_rank):
        assert held["gpipe"] == pytest.approx(8, rel=1e-6), (stage, held)
        assert held["1f1b"] == pytest.approx(4 - stage, rel=1e-6), (stage, held)

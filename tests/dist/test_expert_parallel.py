"""Expert parallelism against one process with the global batch (forge_dist.testing.ep_parity):
in one world of 4, the layouts EP=4, EP=2 x DP=2, EP=2 x TP=2 (experts TP-split inside, and whole
with expert_tensor_parallel_size=1, and with sequence parallelism) and plain DP=4, each with top-1 and top-2 routing, dropless
and with a capacity factor (aux and z losses on); every other MLP variant as the experts at EP=4
and EP=2 x TP=2; EP=2 inside each of PP=2 stages (the pipeline engine's reduction, norm and
gathered checkpoint). With expert_tensor_parallel_size=1 each TP rank routes and dispatches half
of its replica's tokens (checked), with and without sequence parallelism. Statuses must equal docs/support_matrix.md's expert-parallel section. Loss 1e-6, every gradient (router, experts,
dense) 1e-5 after the engine's reduction (DDP over dp, experts over expert_dp), grad norm 1e-5,
tokens per expert exact, weights after one AdamW step exact, the same step under --zero_stage 1
(dense moments sharded over dp, experts' over expert_dp: parallel/expert/zero.py) exact, and the
placed MoE layer against the per-token loop 1e-5."""
import os

import pytest

from forge_dist.testing.ep_matrix import EP_LAYOUTS, read_ep_section, run_ep_matrix
from forge_dist.testing.ep_parity import ep_cases
from forge_dist.testing.spawn import spawn

MATRIX = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                      "support_matrix.md")

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.timeout(420)
def test_expert_parallel_layouts_equal_one_process():
    rows = spawn(run_ep_matrix, 4, timeout=400)
    assert {(layout, case) for layout, case, *_ in rows} == {(l, c) for l in EP_LAYOUTS for c in ep_cases(l)}
    problems = [f"{layout} {router}: {status}: {detail}" for layout, router, status, detail, _ in rows
                if status != "pass"]
    assert not problems, "\n".join(problems)
    for layout, router, _, _, worst in rows:
        assert set(worst) >= {"loss", "grad", "grad norm", "records", "step"}, (layout, router)
        if "PP" not in layout:  # every other layout has DP > 1: the same step under ZeRO-1, exact
            assert "zero-1 step" in worst, (layout, router)
        if "capacity" in router:  # the capacity cases drop assignments, so the cut is compared too
            assert worst["dropped"] > 0, (layout, router)
        else:  # the grouped all-to-all path against the per-token loop
            assert worst["dropped"] == 0 and "per-token" in worst, (layout, router)
            if "routed share" in worst:  # expert_tensor_parallel_size=1: each TP rank routes half the tokens
                assert worst["routed share"] == (0.5 if "ETP1" in layout else 1.0), (layout, router, worst)
    with open(MATRIX) as f:
        documented = read_ep_section(f.read())
    measured = {(case, layout): status for layout, case, status, *_ in rows}
    assert measured == documented, "docs/support_matrix.md is out of date (python tools/gen_support_matrix.py)"

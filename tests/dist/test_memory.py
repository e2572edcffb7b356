"""No rank holds the whole model: a GPT whose fp32 weights plus AdamW moments are about 400 MB
builds (on the meta device, shards materialised) and takes an AdamW step at TP=2 with each rank's
peak resident memory above its idle baseline at most 1/2 + 15% of the one-process figure
(forge_dist.testing.memory; bench/memory.py prints the same figures for larger models)."""
import pytest

from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.dist]

CFG = dict(n_layer=4, n_embd=768, n_head=12, vocab_size=8192, block_size=32, dropout=0.0, bias=False)


@pytest.mark.timeout(240)
def test_tp2_rank_peak_memory_is_half_of_one_process_plus_15_percent():
    from forge_dist.testing.memory import measure

    single = spawn(measure, 1, CFG, 1, 32, timeout=110)
    per_rank = spawn(measure, 2, CFG, 1, 32, timeout=110, return_all=True)
    weights_mb = single["local_params"] * 4 / 2 ** 20
    assert 3 * weights_mb > 350, "the model must be several hundred MB with its AdamW state"
    for rank, r in enumerate(per_rank):
        assert r["step"] <= (0.5 + 0.15) * single["step"], (rank, r, single)
        assert r["local_params"] < 0.6 * single["local_params"]

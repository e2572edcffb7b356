"""--compile as users get it (inductor) draws eager's dropout masks: fallback_random is set, so the
RNG guarantees tested eager (tensor-parallel RNG regions, exact resume) hold compiled. The compiled
numerics themselves are compared with eager in tests/dist/test_data_parallel.py (aot_eager)."""
import torch
import torch._inductor.config as inductor_config

from forge_dist.train.engine import compiled


def test_compile_uses_the_eager_random_stream():
    # inductor's config module, not monkeypatch: pytest's undo deletes a key it did not find in the
    # module's __dict__ (torch's ConfigModule serves keys through __getattr__), which breaks every
    # later torch.compile in the process; patch() restores the prior value, also after compiled()
    before = inductor_config.fallback_random
    with inductor_config.patch(fallback_random=False):
        module = torch.nn.Linear(2, 2)
        assert compiled(module, False) is module
        assert compiled(module, True) is not module and inductor_config.fallback_random is True
    assert inductor_config.fallback_random is before  # later compiles in this process see torch's config

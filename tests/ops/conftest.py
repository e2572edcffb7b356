"""The kernel tests need the library: a failed build fails them (never a skip). They test the
kernels whatever FORGE_OPS says for the rest of the run (e.g. a FORGE_OPS=reference parity run of
the whole suite), and put the switch back afterwards."""
import pytest

from forge_dist.ops import registry


@pytest.fixture(autouse=True)
def kernels_loaded(monkeypatch):
    monkeypatch.setenv("FORGE_OPS", "auto")
    registry.refresh()
    state = registry.ensure_loaded()
    assert "cpu" in state.devices, f"the fused kernels did not load: {state.reason}"
    yield state
    monkeypatch.undo()
    registry.refresh()

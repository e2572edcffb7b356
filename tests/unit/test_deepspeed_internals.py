"""The DeepSpeed internals the engine reaches into are all where it expects them in the installed
DeepSpeed, and a moved one is refused by name with the tested version range."""
import pytest

from forge_dist.errors import ConfigError
from forge_dist.train import deepspeed_internals

pytest.importorskip("deepspeed")


def test_installed_deepspeed_has_every_internal_the_engine_uses():
    assert deepspeed_internals.missing_internals() == []
    deepspeed_internals.check_deepspeed()


def test_a_moved_internal_is_refused_with_a_clear_message(monkeypatch):
    import deepspeed.utils

    monkeypatch.delattr(deepspeed.utils, "safe_set_full_optimizer_state")
    with pytest.raises(ConfigError) as e:
        deepspeed_internals.check_deepspeed()
    message = str(e.value)
    assert "safe_{get,set}_full_{fp32_param,optimizer_state}" in message
    assert "deepspeed>=0.19.8,<0.20" in message and deepspeed_internals.missing_internals() != []


def test_the_pin_is_the_checked_range():
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    for name in ("requirements-cpu.txt", "setup.py"):
        with open(os.path.join(root, name)) as f:
            assert "deepspeed" + deepspeed_internals.SUPPORTED in f.read().replace(" ", ""), name


def test_class_sources_are_read_once_per_process(monkeypatch):
    """Every engine build runs check_deepspeed: the classes' source (inspect tokenizes their whole
    module) is read at the first check only; attribute checks still run every time (see above)."""
    import inspect

    deepspeed_internals.check_deepspeed()
    monkeypatch.setattr(inspect, "getsource", lambda *a: pytest.fail("a class's source was read again"))
    assert deepspeed_internals.missing_internals() == []

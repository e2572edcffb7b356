"""Test helpers: numerics (gradcheck), spawned gloo worlds (spawn), tensor-parallel parity (parity,
tp_cases)."""
from forge_dist.testing.spawn import RankError, SpawnTimeout, spawn  # noqa: F401

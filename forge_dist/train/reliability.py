"""The options of forge-train's failure handling (docs/reliability.md), one dataclass per family.

``DiagnosticsOptions`` describe how this launch watches itself (a launch option: ``--init_from
resume`` takes them from the command line, never from the checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass

from forge_dist.errors import ConfigError


@dataclass
class DiagnosticsOptions:
    collective_timeout_s: float = 600.0  # a collective waiting longer is diagnosed (train/diagnostics.py)
    debug_collectives: bool = False  # compare a fingerprint of every collective across its group first

    def __post_init__(self):
        t = self.collective_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"collective_timeout_s={t!r} must be a positive number of seconds")
        if not isinstance(self.debug_collectives, bool):
            raise ConfigError(f"debug_collectives={self.debug_collectives!r} must be true or false")


DIAGNOSTICS_HELP = {
    "collective_timeout_s": "a collective that waits longer than this writes out_dir/diagnostics/rank_<r>.txt on "
                            "every rank and names the rank that did not arrive; a lost or deadlocked rank ends the "
                            "run (exit 3), a merely slow one gets a warning.",
    "debug_collectives": "before every collective its group compares (op, shapes, dtype, sequence number): the "
                         "first mismatch stops every member with one line naming the ranks and call sites "
                         "(slow: for debugging).",
}


def diagnostics_options(values) -> DiagnosticsOptions:
    return DiagnosticsOptions(**{k: values[k] for k in ("collective_timeout_s", "debug_collectives") if k in values})

"""What ``--init_from resume`` changes, and the schedule it keeps.

A resumed run takes its saved options, then the ones given now. Options whose default is derived
from another one would silently move with it: ``lr_decay_iters`` unset means "max_iters", so
``--max_iters 1200`` after an 800-iteration cosine run would stretch the schedule and raise the
learning rate mid-run. The saved horizon is kept unless the user gives it explicitly, and every
change is reported, so the resumed run is the uninterrupted run with the same schedule.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

# option -> the option its unset value follows
DERIVED = {"lr_decay_iters": "max_iters"}
NOT_CHANGES = ("init_from", "init_from_ckpt")  # how to resume, not what the run is


def resume_overrides(saved: Dict, explicit: Dict) -> Tuple[Dict, List[str]]:
    """(values pinned to keep the saved schedule, one-line notes of what changed)."""
    pinned, notes = {}, []
    for key in sorted(explicit):
        if key in saved and key not in NOT_CHANGES and explicit[key] != saved[key]:
            notes.append(f"resume: {key} {saved[key]} -> {explicit[key]} (given on the command line)")
    for key, follows in DERIVED.items():
        if saved.get(key) is None and key not in explicit and follows in explicit \
                and explicit[follows] != saved.get(follows):
            pinned[key] = saved[follows]
            notes.append(f"resume: {key} stays {saved[follows]} (the saved schedule's horizon, which followed "
                         f"{follows}); give --{key} to change it")
    return pinned, notes

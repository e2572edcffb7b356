"""Collectives that raised outside forge_dist's flight recorder: DeepSpeed's own (ZeRO's bucket
all-reduces, its partition all-gathers), torch's object collectives of a background checkpoint.

They call torch.distributed directly, so no recorder entry says which collective failed; when a peer
dies, gloo raises "Connection reset by peer" (or closed, or a timeout) from inside them.
``foreign_failure`` reads the exception instead: whether it is a transport failure, the torch.distributed
call it came from (its name, its group's ranks from the call's own ``group`` argument) and the
caller that issued it. The diagnostics (diagnostics.py ``report_failure``) then name the lost rank
from the heartbeats exactly as for a recorded collective.
"""
from __future__ import annotations

import os
import time
from typing import List, Optional

# what gloo's TCP transport (and torch's store and backend errors) say when a peer is gone
_TRANSPORT_MARKS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
                    "Socket Timeout", "Timed out waiting", "gloo/transport", "DistNetworkError", "DistBackendError")
_COMM_DIRS = (os.path.join("torch", "distributed", ""), os.path.join("deepspeed", "comm", ""))
_C10D = os.path.join("distributed", "distributed_c10d.py")


def transport_error(error: BaseException) -> Optional[BaseException]:
    """The transport failure in ``error``'s chain (causes and contexts), or None: torch's DistError,
    or a RuntimeError raised inside a torch.distributed call that says a connection failed (gloo's;
    an unrelated "Broken pipe" elsewhere is not one)."""
    import torch.distributed as dist

    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, dist.DistError):
            return e
        if (isinstance(e, RuntimeError) and any(m in str(e) for m in _TRANSPORT_MARKS)
                and any(_C10D in f.f_code.co_filename for f, _ in _frames(e))):
            return e
        e = e.__cause__ or e.__context__
    return None


def _frames(error: BaseException) -> List:
    tb, out = error.__traceback__, []
    while tb is not None:
        out.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return out


def _shown(path: str) -> str:
    """A source path as messages show it: from the package directory on (forge_dist/..., deepspeed/...)."""
    parts = os.path.normpath(path).split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("site-packages", "dist-packages") and i + 1 < len(parts):
            return "/".join(parts[i + 1:])
    if "forge_dist" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("forge_dist"):])
    return os.path.basename(path)


def foreign_failure(error: BaseException, world_size: int):
    """A flight.Entry for a collective outside the recorder that failed with a transport error
    (``None`` when ``error`` is not one): op, group and ranks from the torch.distributed call it was
    raised in, site: the first caller outside torch.distributed and deepspeed.comm."""
    import torch.distributed as dist

    from forge_dist.parallel.flight import Entry, FlightRecorder

    cause = transport_error(error)
    if cause is None:
        return None
    frames = _frames(cause)
    op, ranks, site = "collective", tuple(range(world_size)), "?"
    for i, (frame, _) in enumerate(frames):
        if frame.f_code.co_filename.endswith(_C10D):
            op = frame.f_code.co_name
            group = frame.f_locals.get("group")
            try:  # the call's own group; None is the world
                ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ranks
            except Exception:  # noqa: BLE001  (a group already torn down: the world is the best guess)
                pass
            callers = [(f, n) for f, n in frames[:i] if not any(d in f.f_code.co_filename for d in _COMM_DIRS)]
            if callers:
                f, n = callers[-1]
                site = f"{_shown(f.f_code.co_filename)}:{n} in {f.f_code.co_name}"
            break
    name = "world" if len(ranks) == world_size else "group"
    message = " ".join(str(cause).split())[:300] or type(cause).__name__
    return Entry(0, op, FlightRecorder.group_label(name, ranks), ranks, (), "?", site, time.time(), 0.0, message)

"""What the user sees while training (rank 0 only): a tqdm bar with iteration, loss, tokens/s, MFU
and ETA, or, with the bar off (--no-progress, logs to a file), one plain line per logged step."""
from __future__ import annotations

import sys
import time
from typing import Optional


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def fmt_mfu(mfu: Optional[float]) -> str:
    """``, MFU x%`` when the device's peak is known, else nothing (the run says why once, at start)."""
    return "" if mfu is None else f", MFU {100 * mfu:.1f}%"


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, bar: bool):
        self.enabled, self.total, self.initial = enabled, total, initial
        self._first = None  # (time, iterations done) of the first step the ETA measures from
        self._bar = None
        if enabled and bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr,
                             bar_format="iter {n_fmt}/{total_fmt} |{bar:24}| {desc} [{elapsed}<{remaining}]")

    def eta(self, done: int) -> float:
        """Remaining time at the rate measured since the first completed step, so start-up (dataset
        preparation, a kernel build, the first evaluation) does not inflate the estimate."""
        now = time.time()
        if self._first is None:
            self._first = (now, done)
            return float("nan")
        t_first, done_first = self._first
        run = done - done_first
        return (now - t_first) / run * (self.total - done) if run > 0 else float("nan")

    def step(self, done: int, record: dict, logged: bool) -> None:
        """``done`` iterations complete; ``record`` is the latest logged step."""
        if not self.enabled:
            return
        # loss is the cross-entropy; an MoE run's auxiliary losses (added for the backward) beside it
        aux = f" (aux {record['aux_loss']:.4f})" if record.get("aux_loss") is not None else ""
        stats = f"loss {record['loss']:.4f}{aux}, {human(record['tokens_per_s'])} tok/s{fmt_mfu(record['mfu'])}"
        if self._bar is not None:
            self._bar.set_description_str(stats, refresh=False)
            self._bar.update(done - self._bar.n)
        elif logged:
            eta = self.eta(done)
            tail = f", ETA {fmt_time(eta)}" if eta == eta else ""
            print(f"iter {record['iter']}: {stats}, lr {record['lr']:.2e}{tail}", flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

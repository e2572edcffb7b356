"""Preflight of a launch: does every rank run the same thing, and does every group talk?

    <any launcher> forge-preflight <forge-train options>      # or: forge-train --preflight ...

Every rank reports its host, local rank, devices, the torch / DeepSpeed / forge_dist versions, a
hash of the resolved configuration, a hash of forge_dist's code and the free disk in out_dir.
Then each group of the layout runs the collectives the layout uses on it, with known values:

    world   all-reduce, all-to-all          tp   all-reduce, all-gather, reduce-scatter
    dp      all-reduce, all-gather, reduce-scatter (ZeRO)     ep   all-to-all
    pp      send/recv between neighbouring stages

and all-reduce latency (one element) and bus bandwidth (``--bandwidth_mb``, 2(n-1)/n x bytes / time
as nccl-tests report it) are measured per group, the slowest member's time counting. Rank 0 prints
one table; when a rank disagrees with the majority (versions, config or code hash), has a
collective that failed or returned a wrong value, or lacks ``--min_free_gb`` of disk, every rank
exits 1 and rank 0 names the ranks. The launcher then fails too: its status is the worst rank's.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

NEEDS = {"world": ("all_reduce", "all_to_all"), "tp": ("all_reduce", "all_gather", "reduce_scatter"),
         "dp": ("all_reduce", "all_gather", "reduce_scatter"), "ep": ("all_to_all",), "pp": ("send_recv",)}
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
AGREE = ("python", "torch", "deepspeed", "forge_dist", "config_hash", "code_hash")


def code_hash(root: Optional[Path] = None) -> str:
    """sha256 (12 hex digits) over forge_dist's Python files, by relative path and content."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def config_hash(values: Mapping) -> str:
    text = json.dumps({k: values[k] for k in sorted(values) if k != "preflight"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return "-"


def free_gb(path: str) -> float:
    """Free disk where ``path`` is (or would be created)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 2**30


def rank_facts(rank: int, local_rank: int, values: Mapping, out_dir: str) -> Dict:
    devices = ("cuda:" + ",".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
               if torch.cuda.is_available() else "cpu")
    return {"rank": rank, "host": socket.gethostname(), "local_rank": local_rank, "devices": devices,
            "python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": _version("deepspeed"),
            "forge_dist": _version("forge_dist"), "config_hash": config_hash(values), "code_hash": code_hash(),
            "free_gb": round(free_gb(out_dir), 1)}


# --- collectives with known values -----------------------------------------------------------
def _check(kind: str, handle, i: int, n: int, ranks: Sequence[int], device) -> None:
    """Run one collective as member ``i`` of ``n``; raise AssertionError on a wrong value."""
    t = lambda v: torch.tensor([float(v)], dtype=torch.float64, device=device)  # noqa: E731
    if kind == "all_reduce":
        x = t(i + 1)
        dist.all_reduce(x, group=handle)
        expect = n * (n + 1) / 2
        got = x.item()
    elif kind == "all_gather":
        out = [t(-1) for _ in range(n)]
        dist.all_gather(out, t(i), group=handle)
        got, expect = [o.item() for o in out], [float(j) for j in range(n)]
    elif kind == "reduce_scatter":
        out = t(-1)
        dist.reduce_scatter(out, [t(i * n + j) for j in range(n)], group=handle)
        got, expect = out.item(), float(n * n * (n - 1) / 2 + n * i)
    elif kind == "all_to_all":
        out = [t(-1) for _ in range(n)]
        dist.all_to_all(out, [t(i * n + j) for j in range(n)], group=handle)
        got, expect = [o.item() for o in out], [float(j * n + i) for j in range(n)]
    elif kind == "send_recv":  # a ring over the stages: each sends its stage index to the next
        got_t = t(-1)
        reqs = [dist.isend(t(i), ranks[(i + 1) % n], group=handle), dist.irecv(got_t, ranks[(i - 1) % n], group=handle)]
        for req in reqs:
            req.wait()
        got, expect = got_t.item(), float((i - 1) % n)
    else:
        raise ValueError(f"unknown collective {kind!r}")
    if got != expect:
        raise AssertionError(f"got {got}, expected {expect}")


def _timed(handle, numel: int, iters: int, device) -> float:
    x = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(x, group=handle)  # warm-up (connections, buffers)
    dist.barrier(group=handle)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x, group=handle)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def group_checks(groups, world: int, rank: int, device, bandwidth_bytes: int, iters: int = 3) -> List[Dict]:
    """This rank's result for every group it belongs to: each needed collective ('ok' or the error)
    and all-reduce latency (us) and bus bandwidth (GB/s)."""
    members = [("world", tuple(range(world)), None)]
    for kind in ("tp", "dp", "ep", "pp"):
        g = groups.get(kind) if groups is not None else None
        if g is not None and g.size > 1:
            members.append((kind, g.ranks, g.handle))
    rows = []
    for kind, ranks, handle in members:
        i, n = ranks.index(rank), len(ranks)
        row = {"group": kind, "ranks": list(ranks)}
        for coll in NEEDS[kind]:
            try:
                _check(coll, handle, i, n, ranks, device)
                row[coll] = "ok"
            except Exception as e:  # a failing collective is the finding, not a crash
                row[coll] = f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        try:
            row["latency_us"] = _timed(handle, 1, 5, device) * 1e6
            seconds = _timed(handle, max(bandwidth_bytes // 4, 1), iters, device)
            row["busbw_GBps"] = bandwidth_bytes / seconds * 2 * (n - 1) / n / 1e9
        except Exception as e:
            row["all_reduce"] = f"FAILED (timing): {type(e).__name__}: {e}"
        rows.append(row)
    return rows


# --- verdict and table -----------------------------------------------------------------------
def problems(reports: List[Dict], min_free_gb: float) -> List[str]:
    """What is wrong, one line each, naming the ranks."""
    out = []
    for key in AGREE:
        values = Counter(r["facts"][key] for r in reports)
        if len(values) > 1:
            majority = values.most_common(1)[0][0]
            odd = [r for r in reports if r["facts"][key] != majority]
            out.append(f"{key} differs: " + "; ".join(f"rank {r['rank']} ({r['facts']['host']}) has {r['facts'][key]}"
                                                      for r in odd) + f" where the others have {majority}")
    low = [r for r in reports if r["facts"]["free_gb"] < min_free_gb]
    if low:
        out.append(f"less than {min_free_gb} GB free in out_dir: " +
                   ", ".join(f"rank {r['rank']} ({r['facts']['free_gb']} GB)" for r in low))
    for r in reports:
        for row in r["groups"]:
            for coll in COLLECTIVES:
                if str(row.get(coll, "ok")).startswith("FAILED"):
                    out.append(f"rank {r['rank']}: {coll} on {row['group']} group {row['ranks']}: {row[coll]}")
    return out


def _merge_groups(reports: List[Dict]) -> List[Dict]:
    merged: Dict = {}
    for r in reports:
        for row in r["groups"]:
            key = (row["group"], tuple(row["ranks"]))
            m = merged.setdefault(key, dict(row, latency_us=0.0, busbw_GBps=float("inf")))
            for coll in COLLECTIVES:
                if coll in row and row[coll] != "ok":
                    m[coll] = "FAILED"
            m["latency_us"] = max(m["latency_us"], row.get("latency_us", float("nan")))
            m["busbw_GBps"] = min(m["busbw_GBps"], row.get("busbw_GBps", float("nan")))
    return list(merged.values())


def format_table(reports: List[Dict], layout: str) -> str:
    cols = ("rank", "host", "local_rank", "devices", "torch", "deepspeed", "forge_dist", "config_hash", "code_hash",
            "free_gb")
    rows = [[str(r["facts"][c]) for c in cols] for r in reports]
    gcols = ("group", "ranks") + COLLECTIVES + ("latency_us", "busbw_GBps")
    grows = [[g["group"], ",".join(map(str, g["ranks"]))] + [g.get(c, "-") for c in COLLECTIVES]
             + [f"{g['latency_us']:.0f}", f"{g['busbw_GBps']:.3f}"] for g in _merge_groups(reports)]

    def table(header, body):
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *body])

    return f"forge-preflight: {len(reports)} ranks, {layout}\n{table(cols, rows)}\n\n{table(gcols, grows)}"


def run_preflight(ctx, values: Mapping, out_dir: str, bandwidth_mb: float = 8.0, min_free_gb: float = 1.0,
                  local_rank: int = 0, stream=None) -> int:
    """Every rank calls this inside the launch (``ctx``: a RunContext). Returns the exit status,
    the same on every rank: 0, or 1 when ``problems`` found any (rank 0 prints them)."""
    stream = stream or sys.stdout
    device = torch.device(ctx.device)
    facts = rank_facts(ctx.rank, local_rank, values, out_dir)
    rows = (group_checks(ctx.groups, ctx.world_size, ctx.rank, device, int(bandwidth_mb * 2**20))
            if ctx.world_size > 1 else [])
    mine = {"rank": ctx.rank, "facts": facts, "groups": rows}
    if ctx.world_size > 1:
        reports: List = [None] * ctx.world_size
        dist.all_gather_object(reports, mine)
    else:
        reports = [mine]
    found = problems(reports, min_free_gb)
    if ctx.is_main:
        topo = getattr(ctx.groups, "topology", None)
        layout = (f"tp={topo.tp} pp={topo.pp} dp={topo.dp} ep={topo.ep}" if topo is not None else "one process")
        stream.write(format_table(reports, f"{layout}, launcher {ctx.launcher}") + "\n")
        for line in found:
            print(f"forge-preflight: FAILED: {line}", file=sys.stderr)
        if not found:
            stream.write("forge-preflight: every rank agrees and every collective returned the expected values\n")
        stream.flush()
    return 1 if found else 0

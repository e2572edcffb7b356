"""forge_dist.train.deepspeed_gloo: ZeRO-3's gloo reduce-scatter and all-gather done in place give
the same bits as DeepSpeed's calls into gloo, over 4 ranks and a 2-rank subgroup, for float32 and
bfloat16 (values with -0.0, infinities and NaN included in the all-gather), and take no
full-size temporary."""
import pytest

from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _peak_above(fn) -> float:
    """Peak resident MB of ``fn()`` above the resident memory before it (Linux /proc)."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def world4(rank, world_size):
    import ctypes

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.comm import coalesced_collectives as cc
    from deepspeed.runtime.zero import partition_parameters as pp

    from forge_dist.train import deepspeed_gloo
    from forge_dist.train.deepspeed_engine import skip_shm_build

    skip_shm_build()
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # freed temporaries go back to the OS (dist/malloc.py)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    real_rs, real_ag = cc._torch_reduce_scatter_fn, pp._dist_allgather_fn
    assert deepspeed_gloo.install() and not deepspeed_gloo.install()  # idempotent
    ours_rs, ours_ag = cc._torch_reduce_scatter_fn, pp._dist_allgather_fn
    pair = dist.new_group([0, 1])
    out = {"mismatches": [], "peaks": {}}
    for group, size in ((None, 4), (pair, 2)):
        if group is pair and rank > 1:
            continue
        me = dist.get_rank(group)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(rank)
            grad = torch.randn(size * 1000, generator=g).to(dtype) / 3
            results = []
            for fn in (real_rs, ours_rs):  # DeepSpeed's caller: the output is a chunk of the input
                buf = grad.clone()
                fn(buf, buf.chunk(size)[me], group=group)
                results.append(buf.chunk(size)[me].clone())
            separate = torch.empty(1000, dtype=dtype)
            ours_rs(grad.clone(), separate, group=group)
            if not (torch.equal(results[0].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                results[1].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
                    and torch.equal(separate, results[1])):
                out["mismatches"].append(("reduce_scatter", size, str(dtype)))
            part = torch.randn(1000, generator=g).to(dtype)
            part[:4] = torch.tensor([-0.0, 0.0, float("inf"), float("-inf")], dtype=dtype)
            part[4] = float("nan")
            gathered = []
            for fn in (real_ag, ours_ag):
                full = torch.empty(size * 1000, dtype=dtype)
                fn(part, full, group=group).wait()
                gathered.append(full)
            bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
            if not torch.equal(gathered[0].view(bits), gathered[1].view(bits)):
                out["mismatches"].append(("all_gather", size, str(dtype)))
    if rank < 2:  # no full-size temporary: 6 M elements (24 MB) reduce-scattered and gathered by the pair
        big = torch.ones(6 * 2 ** 20)
        for name, fn, call in (("gloo reduce_scatter", real_rs, lambda f: f(big, big.chunk(2)[rank], group=pair)),
                               ("in place reduce_scatter", ours_rs, lambda f: f(big, big.chunk(2)[rank], group=pair)),
                               ("gloo all_gather", real_ag, lambda f: f(big.chunk(2)[rank], big, group=pair).wait()),
                               ("in place all_gather", ours_ag,
                                lambda f: f(big.chunk(2)[rank], big, group=pair).wait())):
            dist.barrier(pair)
            out["peaks"][name] = _peak_above(lambda: call(fn))
    return out


@pytest.mark.timeout(180)
def test_in_place_gloo_collectives_give_deepspeeds_bits_without_a_full_size_temporary():
    for rank, r in enumerate(spawn(world4, 4, timeout=150, return_all=True)):
        assert r["mismatches"] == [], (rank, r)
        if rank < 2:
            peaks = r["peaks"]
            assert peaks["gloo reduce_scatter"] > 20 and peaks["gloo all_gather"] > 20, peaks  # the control
            assert peaks["in place reduce_scatter"] < 6 and peaks["in place all_gather"] < 6, peaks

"""The DeepSpeed engine (forge_dist.train.deepspeed_engine) in pure data-parallel worlds against the
single-process trainer, and its checkpoints consolidated and converted in this process.

Few spawned worlds, many checks each (a DeepSpeed world costs ~8 s of imports per process):

  world 1  DeepSpeed at DP=1 for ZeRO 0-3 (saves the checkpoints the DP=2 world resumes: 1 -> 2)
  world 2  fp32 ZeRO 0-3, 10 iterations each, checkpoint at 5; resume at the same layout; resume
           of the DP=1 checkpoints; bf16 at every stage; every runnable shipped config
  world 1  resume of the DP=2 checkpoints (2 -> 1), logical optimizer state round trips

The reference is forge_dist's LocalEngine (run in the DP=1 world), at the same global batch and
learning rates (deepspeed_harness.py). ZeRO-1/2 must equal stage 0 bit for bit where DeepSpeed adds
in the same order (see the test), ZeRO-3 to 1e-6, everything the reference to 1e-5. Checkpoints are
then consolidated with zero_to_fp32 and forge-convert in this process. Tensor x data parallelism:
test_deepspeed_tp.py; forge-train under the launchers and hostile checkpoints:
test_deepspeed_launchers.py.
"""
import json
import os

import pytest
import torch

from forge_dist.testing.spawn import spawn

from deepspeed_harness import (CLIP, CLIP_TP, CONFIGS, ITERS, SAVE_AT, STAGES, TINY, TP_MODEL, errors, make_engine,
                               quiet, reference, run_iters, save, shipped_configs)

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def world1_save(rank, world, workdir):
    """The single-process references (forge_dist's LocalEngine), and DP=1 DeepSpeed runs of every
    stage checkpointed at SAVE_AT for the DP=2 world (1 -> 2)."""
    quiet()
    out = {"ref": reference(), "ref_tp": reference(TP_MODEL, CLIP_TP)}
    out.update({stage: run_iters(*make_engine(stage), range(ITERS), save_to=os.path.join(workdir, f"dp1_z{stage}"))
                for stage in STAGES})
    return out


def world2(rank, world, workdir):
    quiet()
    out = {"parity": {}, "resume": {}, "from_dp1": {}, "bf16": {}, "gas1": {}}
    for stage in (0, 1, 2):  # one micro-batch: ZeRO-2 reduces the same sums as stage 0
        out["gas1"][stage] = run_iters(*make_engine(stage, accum=1), range(ITERS))
    for stage in STAGES:
        ckpt = os.path.join(workdir, f"dp2_z{stage}")
        out["parity"][stage] = run_iters(*make_engine(stage), range(ITERS), save_to=ckpt)
        engine, ctx = make_engine(stage)
        engine.load_state(ckpt)  # same layout: DeepSpeed's own files
        out["resume"][stage] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
        engine, ctx = make_engine(stage)
        engine.load_state(os.path.join(workdir, f"dp1_z{stage}"))  # DP 1 -> 2: the logical copy
        out["from_dp1"][stage] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
    for stage in STAGES:
        engine, ctx = make_engine(stage, "bf16")
        out["bf16"][stage] = run_iters(engine, ctx, range(8), fixed_batch=True)
        save(engine, ctx, os.path.join(workdir, f"dp2_bf16_z{stage}"))
        out["bf16"][stage]["logical"] = engine.logical_optimizer_state()
    out["clip"] = {stage: run_iters(*make_engine(stage, model_kwargs=TP_MODEL, clip=CLIP_TP), range(ITERS))
                   for stage in (1, 2, 3)}  # ZeRO's own clipping, acting at every step, pure DP
    out["configs"] = {}
    for name in shipped_configs(runnable_here=True):  # every shipped config trains (2 steps)
        precision = "bf16" if "bf16" in name else "fp32"
        engine, ctx = make_engine(None, precision, config=os.path.join(CONFIGS, name))
        out["configs"][name] = run_iters(engine, ctx, range(2))["loss"]
    return out


def world1_resume(rank, world, workdir):
    """DP 2 -> 1: the continuation, and the re-partitioned state read back (fp32 and bf16)."""
    quiet()
    out = {"fp32": {}, "bf16_logical": {}}
    for stage in STAGES:
        engine, ctx = make_engine(stage)
        engine.load_state(os.path.join(workdir, f"dp2_z{stage}"))
        out["fp32"][stage] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
        engine, ctx = make_engine(stage, "bf16")
        engine.load_state(os.path.join(workdir, f"dp2_bf16_z{stage}"))
        out["bf16_logical"][stage] = engine.logical_optimizer_state()
    return out


# --- fixtures: the worlds, in dependency order ------------------------------------------------------
@pytest.fixture(scope="module")
def dp1(workdir):
    return spawn(world1_save, 1, workdir, timeout=240)


@pytest.fixture(scope="module")
def dp2(workdir, dp1):
    return spawn(world2, 2, workdir, timeout=400)


@pytest.fixture(scope="module")
def dp1_resumed(workdir, dp2):
    return spawn(world1_resume, 1, workdir, timeout=240)


# --- data parallel ---------------------------------------------------------------------------------
def test_zero_1_2_equal_stage_0_bit_for_bit(dp2):
    """Exact wherever DeepSpeed adds the same numbers in the same order: ZeRO-1 always; ZeRO-2 with
    one micro-batch per step (with accumulation it reduces every micro-batch, so its sum is
    (a1 + b1) + (a2 + b2) instead of stage 0's (a1 + a2) + (b1 + b2): within 1e-6)."""
    for runs, stages in ((dp2["gas1"], (1, 2)), (dp2["parity"], (1,))):
        base = runs[0]
        for stage in stages:
            assert max(runs[stage]["grad_norm"]) < CLIP  # no clipping: the precondition of bit-exactness
            assert runs[stage]["loss"] == base["loss"], f"ZeRO-{stage} losses differ from stage 0"
            for k, v in base["weights"].items():
                assert torch.equal(runs[stage]["weights"][k], v), f"ZeRO-{stage}: {k} differs from stage 0"
    e = errors("ZeRO-2 vs stage 0 with 2 accumulated micro-batches", dp2["parity"][2], dp2["parity"][0])
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-6


def test_zero_3_matches_stage_0(dp2):
    e = errors("ZeRO-3 vs stage 0 (DP=2)", dp2["parity"][3], dp2["parity"][0])
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-6


def test_every_stage_matches_single_process(dp1, dp2):
    for name, runs in (("DP=2", dp2["parity"]), ("DP=1", dp1)):
        for stage in STAGES:
            e = errors(f"{name} ZeRO-{stage} vs one process", runs[stage], dp1["ref"])
            assert max(e.values()) <= 1e-5, (name, stage, e)


def test_resume_at_the_same_layout_is_exact(dp2):
    for stage in STAGES:
        full, resumed = dp2["parity"][stage], dp2["resume"][stage]
        assert resumed["loss"] == full["loss"][SAVE_AT:], f"ZeRO-{stage}"
        for k, v in full["weights"].items():
            assert torch.equal(resumed["weights"][k], v), f"ZeRO-{stage}: {k}"


def test_resume_on_another_data_parallel_size(dp1, dp2, dp1_resumed):
    for stage in STAGES:
        for name, resumed, full in (("1 -> 2", dp2["from_dp1"][stage], dp1[stage]),
                                    ("2 -> 1", dp1_resumed["fp32"][stage], dp2["parity"][stage])):
            e = errors(f"resume DP {name} ZeRO-{stage} vs uninterrupted", resumed, full, offset=SAVE_AT)
            assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, (name, stage, e)


def test_repartitioned_optimizer_state_is_the_saved_one(dp2, dp1_resumed):
    """bf16 (fp32 master weights and Adam moments) saved at DP=2, loaded at DP=1, read back."""
    for stage in STAGES:
        saved, loaded = dp2["bf16"][stage]["logical"], dp1_resumed["bf16_logical"][stage]
        assert saved["step"] == loaded["step"] == 8
        assert saved["params"].keys() == loaded["params"].keys()
        for name, tensors in saved["params"].items():
            assert tensors.keys() == {"fp32", "exp_avg", "exp_avg_sq"}
            for key, t in tensors.items():
                assert torch.equal(loaded["params"][name][key], t), (stage, name, key)


def test_every_shipped_config_trains(dp2):
    assert sorted(dp2["configs"]) == shipped_configs(runnable_here=True)
    assert len(dp2["configs"]) == 11  # 4 stages x (fp32, bf16), 3 offload variants
    for name, losses in dp2["configs"].items():
        assert all(torch.isfinite(torch.tensor(losses))), name


def test_bf16_trains_at_every_stage(dp2):
    for stage in STAGES:
        losses = dp2["bf16"][stage]["loss"]
        assert losses[-1] < losses[0] - 0.3, f"ZeRO-{stage} bf16: {losses}"
        assert dp2["bf16"][stage]["skipped_steps"] == 0

def test_zero_clipping_in_a_pure_data_parallel_world(dp1, dp2):
    ref = dp1["ref_tp"]  # one process, the same model and clip
    assert min(ref["grad_norm"]) > CLIP_TP  # clipped at every step
    for stage, run in dp2["clip"].items():
        e = errors(f"DP=2 ZeRO-{stage} clipping vs one process", run, ref)
        assert max(e.values()) <= 1e-5, (stage, e)



# --- checkpoints in our format ----------------------------------------------------------------------
def test_zero_checkpoints_consolidate_to_the_saved_weights(dp2, workdir, tmp_path):
    """zero_to_fp32 per model-parallel rank, TP shards joined: the weights at SAVE_AT (fp32), the
    fp32 master weights (bf16), and TP=2 x DP=2."""
    from forge_dist.io.deepspeed_ckpt import consolidate

    for stage in STAGES:
        state, cfg, meta = consolidate(os.path.join(workdir, f"dp2_z{stage}", "deepspeed"))
        assert meta["layout"]["zero_stage"] == stage and cfg.n_layer == TINY["n_layer"]
        saved = _logical_fp32(os.path.join(workdir, f"dp2_z{stage}"))
        for name, t in saved.items():
            assert torch.equal(state[name], t), (stage, name)
        bf16_state, _, _ = consolidate(os.path.join(workdir, f"dp2_bf16_z{stage}"))
        for name, tensors in dp2["bf16"][stage]["logical"]["params"].items():
            assert torch.equal(bf16_state[name], tensors["fp32"]), ("bf16", stage, name)


def _safetensors_parts(file):
    """(parsed header, data bytes): safetensors orders its __metadata__ keys at random."""
    with open(file, "rb") as fh:
        raw = fh.read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_forge_convert_streams_zero_checkpoints_one_tensor_at_a_time(dp2, workdir, tmp_path, monkeypatch):
    """forge-convert --to forge reads ZeRO 0-3 checkpoints (fp32, and bf16's fp32 masters) from
    memory-mapped partitions one logical tensor at a time: no tensor it made is alive when it makes
    the next, every value equals consolidate's (zero_to_fp32), and the files are those the whole-model
    path (load_deepspeed + save_pretrained) writes, byte for byte."""
    import weakref

    from forge_dist.io import deepspeed_stream
    from forge_dist.io.convert import convert
    from forge_dist.io.deepspeed_ckpt import consolidate, load_deepspeed
    from forge_dist.io.forge_format import WEIGHTS_NAME, save_pretrained

    made = []
    assembled = deepspeed_stream.DeepSpeedReader.tensor

    def one_at_a_time(reader, name):
        assert all(ref() is None for ref in made), f"a logical tensor is still alive when {name} is read"
        t = assembled(reader, name)
        made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(deepspeed_stream.DeepSpeedReader, "tensor", one_at_a_time)
    for stage in STAGES:
        for src in (os.path.join(workdir, f"dp2_z{stage}"), os.path.join(workdir, f"dp2_bf16_z{stage}")):
            made.clear()
            out = tmp_path / f"stream_{len(os.listdir(tmp_path))}"
            assert convert(src, str(out / "streamed"), "forge") == str(out / "streamed")
            model, training = load_deepspeed(src)
            save_pretrained(model, str(out / "whole"), training=training)
            state, _, meta = consolidate(src)
            header, data = _safetensors_parts(out / "streamed" / WEIGHTS_NAME)
            assert (header, data) == _safetensors_parts(out / "whole" / WEIGHTS_NAME), src
            assert len(made) == len(header) - 1 == len(state) - len(meta.get("aliases", {}))
            with open(out / "streamed" / "config.json") as a, open(out / "whole" / "config.json") as b:
                assert a.read() == b.read()
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, end = entry["data_offsets"]
                    dtype = {v: k for k, v in deepspeed_stream._ST_DTYPES.items()}[entry["dtype"]]
                    value = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).view(entry["shape"])
                    assert torch.equal(value, state[name].to(dtype)), (src, name)


def test_forge_convert_streams_zero_checkpoints_to_reallm_forge(dp2, workdir, tmp_path):
    """--to reallm-forge from ZeRO 0-3 checkpoints (fp32 and bf16) is planned on the meta device and
    filled one block at a time (io/stream_export.py): each logical tensor read once, and the ckpt.pt
    holds the records torch.save writes for the whole-model path (load_deepspeed + save_ckpt)."""
    import zipfile

    from forge_dist.io import stream_export
    from forge_dist.io.deepspeed_ckpt import load_deepspeed
    from forge_dist.io.reallm_forge import save_ckpt

    def records(file):
        with zipfile.ZipFile(file) as z:
            return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}

    for stage in STAGES:
        for src in (os.path.join(workdir, f"dp2_z{stage}"), os.path.join(workdir, f"dp2_bf16_z{stage}")):
            out = tmp_path / os.path.basename(src)
            source = stream_export.open_source(src)
            streamed = stream_export.save_ckpt_streamed(source, str(out / "s" / "ckpt.pt"))
            assert len(source.reads) == len(set(source.reads)) == len(source.names) - 1  # the tied head: once
            model, training = load_deepspeed(src)
            assert records(streamed) == records(save_ckpt(model, str(out / "w" / "ckpt.pt"), training=training)), src


def _logical_fp32(checkpoint):
    from forge_dist.io.deepspeed_ckpt import LOGICAL_NAME
    from forge_dist.io.statefile import load_state

    return {n: t["fp32"] for n, t in load_state(checkpoint, LOGICAL_NAME)["params"].items()}

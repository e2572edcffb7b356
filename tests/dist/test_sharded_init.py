"""Sharded initialisation (forge_dist.parallel.materialize): a tensor-parallel rank that builds on
the meta device, applies the plan and materialises only its shards holds exactly the slices of a
full single-process build, for every tensor-parallel test case; a rank resumed from a checkpoint
reads its slices tensor by tensor. Exact equality: the values come from the same streams.

The same world also starts forge-train runs from a one-process checkpoint's weights (--init_from
prev_run) at TP=2 (the gathered safetensors) and PP=2 (the sharded DCP checkpoint): each rank's
initial tensors are exactly the checkpoint's (a stage never materialises another stage's layers),
its losses are the one-process prev_run's, and its reader was asked only for this rank's pieces.
A ReaLLM-Forge ckpt.pt (memory-mapped) and a transformers directory (safetensors slices, mapped
through the architecture's transforms block by block) start PP=2 runs and fill TP=2 shards the same
way, with every whole-model conversion path (load_any, load_ckpt, load_hf, read_tensors) made to
raise while they run."""
import os

import pytest
import torch

from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def zip_records(file):
    import zipfile

    with zipfile.ZipFile(file) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        return f"names differ: {sorted(set(sa) ^ set(sb))[:4]}"
    bad = [n for n in sa if sa[n].shape != sb[n].shape or not torch.equal(sa[n], sb[n])]
    return f"values differ: {bad[:4]}" if bad else None


def compare_cases(rank, world_size, tp, selection, workdir):
    from forge_dist import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.errors import ConfigError
    from forge_dist.io import save_pretrained
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.io.slice_read import load_shards
    from forge_dist.parallel.materialize import materialize_shards
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.topology import Topology
    from forge_dist.testing.parity import select_cases

    groups = ProcessGroups.build(Topology(world_size, tp=tp))
    pc = ParallelConfig(tensor_parallel_size=tp)
    out = {}
    for name, kwargs in select_cases(selection):
        cfg = ModelConfig(**kwargs)
        try:
            torch.manual_seed(3)
            ref = parallelize(GPT(cfg), groups, pc)
        except ConfigError:
            out[name] = "refused"
            continue
        torch.manual_seed(3)
        deferred = GPT(cfg, defer_init=True)
        assert any(p.is_meta for p in deferred.parameters())
        parallelize(deferred, groups, pc)
        materialize_shards(deferred, groups)
        out[name] = _states_equal(ref, deferred) or "same"
    # resume: a full single-process checkpoint read shard by shard
    cfg = ModelConfig(**select_cases("core")[0][1])
    torch.manual_seed(5)
    full = GPT(cfg)
    path = os.path.join(workdir, "model")
    if rank == 0:
        save_pretrained(full, path)
    torch.distributed.barrier()
    ref = parallelize(full, groups, pc)
    torch.manual_seed(6)  # other drawn weights: loading must overwrite them all
    loaded = GPT(cfg, defer_init=True)
    parallelize(loaded, groups, pc)
    load_shards(loaded, path, groups)
    out["<resume>"] = _states_equal(ref, loaded) or "same"
    return out


ARGS = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
        "--eval_iters", "1", "--eval_interval", "100", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--dropout", "0.0",
        "--learning_rate", "1e-2", "--gradient_accumulation_steps", "2", "--max_iters", "2"]


def _initial_state(box, gather):
    """A fit hook: the run's initial tensors (TP shards gathered into logical tensors when ``gather``;
    a pipeline rank's other stages left as meta tensors), before the first step."""
    def hook(run):
        from forge_dist.parallel.tensor.metadata import full_tensor, shard_info

        for name, t in run.model.state_dict(keep_vars=True).items():
            box[name] = (full_tensor(t, shard_info(t), run.ctx.groups) if gather else t.detach()).clone()
    return hook


class _NoWholeModel:
    """Every whole-model conversion path raises while this is entered."""

    def __enter__(self):
        import forge_dist.io.hf as hf
        import forge_dist.io.hf.files as files
        import forge_dist.io.pretrained as pretrained
        import forge_dist.io.reallm_forge as reallm_forge

        def refuse(*a, **k):
            raise AssertionError("a whole-model conversion path was called")
        self.saved = [(m, n, getattr(m, n)) for m, n in ((pretrained, "load_any"), (reallm_forge, "load_ckpt"),
                                                         (hf, "load_hf"), (files, "read_tensors"))]
        for m, n, _ in self.saved:
            setattr(m, n, refuse)

    def __exit__(self, *exc):
        for m, n, f in self.saved:
            setattr(m, n, f)


def prev_run_cases(rank, world_size, workdir, dataset, gathered, sharded, upstream, hf):
    """forge-train --init_from prev_run at TP=2 from ``gathered`` (a model directory), at PP=2 from
    ``sharded`` (a one-process sharded training checkpoint), from ``upstream`` (its ckpt.pt) and from
    ``hf`` (a transformers directory); then every reader asked directly for a TP=2 rank's pieces."""
    from forge_dist.io import from_pretrained
    from forge_dist.io.forge_format import read_config
    from forge_dist.io.hf import DERIVED_SUFFIXES
    from forge_dist.io.pretrained import open_slices_any
    from forge_dist.io.slice_read import DcpSlices, SafetensorsSlices
    from forge_dist.io.slice_read import load_slices
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.metadata import shard_info, shard_tensor
    from forge_dist.testing.runs import fit, logged_losses, parallel_context

    out = {}
    for name, source, tp, pp in (("tp2", gathered, 2, 1), ("pp2", sharded, 1, 2), ("pp2-ckpt", upstream, 1, 2),
                                 ("pp2-hf", hf, 1, 2)):
        state = {}
        with _NoWholeModel():
            fit([*ARGS, "--dataset", dataset, "--out_dir", os.path.join(workdir, name), "--init_from", "prev_run",
                 "--prev_run_ckpt", source], parallel_context(rank, world_size, tp=tp, pp=pp),
                _initial_state(state, gather=tp > 1))
        out[name] = (state, logged_losses(os.path.join(workdir, name)))
    ctx = parallel_context(rank, world_size, tp=2)
    cfg, _ = read_config(gathered)
    full = from_pretrained(gathered).state_dict()
    hf_full = from_pretrained(hf).state_dict()  # the whole conversion, to compare with
    with _NoWholeModel():
        readers = [("safetensors", cfg, full, SafetensorsSlices(gathered)),
                   ("dcp", cfg, full, DcpSlices(os.path.join(sharded, "checkpoints", "iter_0000002", "model"))),
                   ("reallm-forge", cfg, full, open_slices_any(upstream)[1]), ("hf", *open_slices_any(hf))]
    readers[-1] = ("hf", readers[-1][1], hf_full, readers[-1][2])
    for fmt, cfg, full, reader in readers:
        model = parallelize(GPT(cfg, defer_init=True), ctx.groups, ctx.parallel_config)
        own = model.state_dict(keep_vars=True)
        split = sorted(n for n, t in own.items() if getattr(shard_info(t), "dim", None) is not None)
        local = sum(t.numel() * t.element_size() for t in {id(t): t for t in own.values()}.values())
        with _NoWholeModel():
            load_slices(model, reader, ctx.groups, fresh_ok=fmt == "hf")  # hf: derived buffers are drawn
        wrong = [n for n, t in model.state_dict(keep_vars=True).items() if not n.endswith(DERIVED_SUFFIXES)
                 and not torch.equal(t.detach(), shard_tensor(full[n], shard_info(t), rank, 2)
                                    if shard_info(t) is not None else full[n])]
        out[fmt] = dict(requests=reader.requests, read=reader.bytes_read, local=local, split=split, wrong=wrong,
                        whole=getattr(reader, "whole_reads", []), full_bytes=sum(
                            t.numel() * t.element_size() for t in full.values()))
    return out


def expert_cases(rank, world_size, workdir):
    """EP=2 through build_model (what forge-train calls): drawn on meta with only this rank's experts
    materialised, equal to the full build placed; from --init_from prev_run's weights and from a
    gathered checkpoint's (resume), reading no expert another rank holds."""
    from forge_dist import ModelConfig
    from forge_dist.io import save_pretrained
    from forge_dist.io.slice_read import SafetensorsSlices
    from forge_dist.model.gpt import GPT
    from forge_dist.testing.ep_parity import ep_model_kwargs
    from forge_dist.testing.runs import parallel_context
    from forge_dist.train.model_build import build_model, seed_everything, shard_model
    from forge_dist.train.options import TrainConfig

    cfg = ModelConfig(**ep_model_kwargs("top2"))
    ctx = parallel_context(rank, world_size, ep=2)
    train_cfg = TrainConfig(device="cpu", dtype="float32", seed=7)
    seed_everything(7)
    out = {"drawn": _states_equal(shard_model(GPT(cfg), ctx, 7), build_model(cfg, train_cfg, ctx)[0])}
    torch.manual_seed(5)
    full = GPT(cfg)
    ckpt = os.path.join(workdir, "moe_ckpt")
    if rank == 0:
        save_pretrained(full, os.path.join(ckpt, "model"))
    torch.distributed.barrier()
    want = shard_model(full, ctx, 7)
    mine = sorted(n for n in want.state_dict() if ".experts." in n)  # parameters and buffers
    for name in ("prev_run", "resume"):
        reader = SafetensorsSlices(os.path.join(ckpt, "model"))
        if name == "prev_run":
            model = build_model(cfg, train_cfg, ctx, prev_state=reader)[0]
        else:  # the resume reads through its own reader: record what this rank asked of the same file
            import forge_dist.io.slice_read as slice_read

            opened = []
            real = slice_read.SafetensorsSlices
            slice_read.SafetensorsSlices = lambda d: opened.append(real(d)) or opened[-1]
            try:
                model = build_model(cfg, train_cfg, ctx, resume_path=ckpt)[0]
            finally:
                slice_read.SafetensorsSlices = real
            reader = opened[0]
        asked = sorted({n for n, _, _ in reader.requests if ".experts." in n})
        out[name] = (_states_equal(want, model), asked == mine and len(mine) > 0, asked)
    return out


def _world(rank, world_size, workdir, dataset, *sources):
    return compare_cases(rank, world_size, 2, "all", workdir), \
        prev_run_cases(rank, world_size, workdir, dataset, *sources), expert_cases(rank, world_size, workdir)


@pytest.mark.timeout(300)
def test_sharded_init_equals_sliced_full_build_for_every_case(tmp_path):
    from forge_dist.io import from_pretrained
    from forge_dist.io.convert import convert, load_source
    from forge_dist.io.hf import save_hf
    from forge_dist.io.reallm_forge import save_ckpt
    from forge_dist.model.gpt import GPT
    from forge_dist.testing.data import corpus_dataset
    from forge_dist.testing.runs import fit, logged_losses
    from forge_dist.train.context import RunContext

    # a one-process sharded checkpoint, its weights consolidated, and the one-process prev_run from them
    dataset = corpus_dataset(tmp_path, 20_000)
    sharded, gathered = str(tmp_path / "src"), str(tmp_path / "gathered")
    fit([*ARGS, "--dataset", dataset, "--out_dir", sharded, "--checkpoint_format", "sharded",
         "--always_save_checkpoint", "--eval_interval", "2"], RunContext())
    convert(sharded, gathered, "forge")
    fit([*ARGS, "--dataset", dataset, "--out_dir", str(tmp_path / "one"), "--init_from", "prev_run",
         "--prev_run_ckpt", gathered], RunContext())
    want_losses, want = logged_losses(tmp_path / "one"), from_pretrained(gathered).state_dict()
    upstream, hf = convert(gathered, str(tmp_path / "ckpt.pt"), "reallm-forge"), str(tmp_path / "hf")
    llama = from_pretrained(gathered).config.replace(use_rotary_embeddings=True, use_abs_pos_embeddings=False,
                                                     mlp_variant="swiglu", activation_variant="silu")
    torch.manual_seed(7)
    save_hf(GPT(llama), hf)  # a Llama: RoPE rows permuted per head, read per TP shard through the slicer
    hf_want = from_pretrained(hf).state_dict()
    # forge-convert of the sharded (DCP) checkpoint to a ckpt.pt streams it: torch.save's records of the whole path
    streamed = convert(sharded, str(tmp_path / "streamed" / "ckpt.pt"), "reallm-forge")
    model, training = load_source(sharded)
    assert zip_records(streamed) == zip_records(save_ckpt(model, str(tmp_path / "whole" / "ckpt.pt"), training=training))

    per_rank = spawn(_world, 2, str(tmp_path), dataset, gathered, sharded, upstream, hf, timeout=280,
                     return_all=True)
    for rank, (result, prev, experts) in enumerate(per_rank):
        # EP=2: drawn, prev_run and resume each equal the full build placed; only this rank's experts read
        assert experts["drawn"] is None, (rank, experts["drawn"])
        for name in ("prev_run", "resume"):
            differ, only_mine, asked = experts[name]
            assert differ is None and only_mine, (rank, name, differ, asked)
        wrong = {k: v for k, v in result.items() if v not in ("same", "refused")}
        assert not wrong, f"rank {rank}: {wrong}"
        assert sum(v == "same" for v in result.values()) > len(result) // 2
        # prev_run at TP=2 and PP=2: exactly the checkpoint's weights, the one-process losses
        for name in ("tp2", "pp2", "pp2-ckpt", "pp2-hf"):
            state, losses = prev[name]
            other = () if name == "tp2" else ((".h.1.", "ln_f") if rank == 0 else (".h.0.",))  # the other stage's
            held = {k: v for k, v in state.items() if not v.is_meta and not any(o in k for o in other)}
            ref = hf_want if name == "pp2-hf" else want
            derived = ("activation_x_offset", "activation_y_offset")  # drawn from the config, not in a hf file
            differ = [k for k, v in held.items() if not torch.equal(v, ref[k]) and not k.endswith(derived)]
            assert held and not differ, (rank, name, differ[:4])
            assert sorted(losses) == [0, 1], (name, losses)
            for i in want_losses if name != "pp2-hf" else ():
                assert losses[i] == pytest.approx(want_losses[i], rel=2e-5), (rank, name, i)
        # stage 0 holds layer 0, stage 1 layer 1: the other's drawn (Linear) weights were never materialised
        layers = [k for k in prev["pp2"][0] if ".h." in k and k.endswith(".weight")]
        assert layers and all(prev["pp2"][0][k].is_meta != (f".h.{rank}." in k) for k in layers), rank
        # the readers filled this rank's shards of the checkpoint's tensors, reading no more than it holds
        for fmt in ("safetensors", "dcp", "reallm-forge", "hf"):
            asked = prev[fmt]
            assert asked["split"] and not asked["wrong"] and not asked["whole"], (rank, fmt, asked["wrong"])
            assert asked["read"] <= asked["local"] < 0.8 * asked["full_bytes"], (rank, fmt, asked["read"])
    # ... and each element of a TP-split tensor was asked for by exactly one of the two ranks
    for fmt in ("safetensors", "dcp", "reallm-forge", "hf"):
        per_name = {}
        for _, prev, _ in per_rank:
            for name, _, sizes in prev[fmt]["requests"]:
                per_name[name] = per_name.get(name, 0) + torch.Size(sizes).numel()
        for name in per_rank[0][1][fmt]["split"]:
            if name == "lm_head.weight" and name not in per_name:  # tied: read as transformer.wte.weight
                continue
            numel = (hf_want if fmt == "hf" else want)[name].numel()
            assert per_name[name] == numel, (fmt, name, per_name[name], numel)

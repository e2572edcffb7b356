"""forge-train's sharded checkpoint resumed at other layouts (load-time resharding), in one spawned
world of 4 ranks (forge_dist.testing.runs: the runs forge-train builds under a launcher), fp32:

  A  TP=2 x DP=2, 4 iterations, async sharded checkpoints at 2 and 4 (the reference)
  B  TP=1 x DP=4 from A's iteration 2 (TP 2 -> 1), on to 6 with a sync checkpoint at 4
  C  TP=4 x DP=1 from A's iteration 2 (TP 2 -> 4 and DP 2 -> 1)
  D  TP=2 x DP=2 from B's iteration 4 (TP 1 -> 2)
  E  one process (LocalEngine) from A's iteration 2 (TP 2 -> 1 and DP 2 -> 1, no launcher)
  F  a MoE model at EP=2 x DP=4, checkpoints at 2 and 4 (experts under their global index)
  G  EP=4 from F's iteration 2;  H  one process (EP=1) from F's iteration 2
  Z  TP=1 x DP=4 with ZeRO-1 (each replica writes the moments of the parameters it owns), from
     scratch: A's losses;  ZR  TP=2 x DP=2 without ZeRO from Z's iteration 2;  AZ  ZeRO-1 at
     TP=1 x DP=4 from A's iteration 2 (each replica reads the moments of its new part)
  P  PP=2 x DP=2 with ZeRO-1 (pipeline stages, tied table and head) from A's iteration 2 (PP 1 -> 2),
     async: each stage rank writes only its stage's tensors (each replica the moments it owns), under
     the one-process names, a tied one by its first holder
  PR TP=1 x DP=4 from P's iteration 4 (PP 2 -> 1): B's losses
  Q  the MoE model at EP=2 x PP=2, the gathered format (the optimizer state's expert entries);
     QR the same layout from Q's iteration 2, writing the sharded format (experts under global names)
  L  PP=2 x DP=2 on 4 layers (1F1B), 6 iterations, sharded checkpoints at 2, 4 and 6 (the reference);
     L4 PP=4 from L's iteration 2 (PP 2 -> 4);  LV PP=2 x TP=2 with dualpipev from L4's iteration 4
     (PP 4 -> 2, TP 1 -> 2): its rank 0 holds the tied table (stage 0) and head (stage 3) as two
     TP-sharded copies, which its resume fills from one entry and its checkpoint writes once
  X  a copy of B's iteration 6 with one shard flipped: resuming it at TP=2 stops every rank with
     the file's name (each rank hashed only the files it reads; the ranks agreed before reading)

The global batch stays 8 rows (batch_size 2 x gradient_accumulation x DP), so the data position
carries over exactly when DP changes, and every resumed loss equals the uninterrupted run's.
Each rank writes only its shards; the checkpoint's model/ reads back as the gathered weights.
"""
import os

import pytest

from forge_dist.testing.data import corpus_dataset
from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ARGS = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
        "--eval_iters", "1", "--eval_interval", "2", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--always_save_checkpoint",
        "--dropout", "0.0", "--learning_rate", "1e-2", "--grad_clip", "1.0", "--keep_checkpoints", "3"]
MOE = ["--use_moe", "--n_experts", "4", "--moe_top_k", "2", "--moe_layer_freq", "1", "--moe_aux_loss_coef", "0.01"]
DEEP = ["--n_layer", "4"]  # PP=4, and the V shape at PP=2 (2 chunks of a layer per rank)
REL = 2e-5  # fp32 across TP sizes: the reductions are ordered differently


def _ckpt(out, it):
    return os.path.join(out, "checkpoints", f"iter_{it:07d}")


def _worlds(rank, world_size, dataset, root):
    from forge_dist.testing.runs import fit, logged_losses, parallel_context

    def run(name, tp, accum, *extra, ep=1, pp=1, **parallel):
        out = os.path.join(root, name)
        fit([*ARGS, "--dataset", dataset, "--out_dir", out, "--gradient_accumulation_steps", str(accum), *extra],
            parallel_context(rank, world_size, tp=tp, ep=ep, pp=pp, **parallel))
        return logged_losses(out)

    resume = ["--init_from", "resume", "--init_from_ckpt"]
    losses = {"A": run("A", 2, 2, "--max_iters", "4", "--async_checkpoint")}
    files_a = sorted(os.listdir(os.path.join(_ckpt(os.path.join(root, "A"), 2), "model", "dcp")))
    losses["B"] = run("B", 1, 1, *resume, _ckpt(os.path.join(root, "A"), 2), "--max_iters", "6")
    losses["C"] = run("C", 4, 4, *resume, _ckpt(os.path.join(root, "A"), 2), "--max_iters", "4")
    losses["D"] = run("D", 2, 2, *resume, _ckpt(os.path.join(root, "B"), 4), "--max_iters", "6")
    losses["F"] = run("F", 1, 1, *MOE, "--max_iters", "4", ep=2)
    losses["G"] = run("G", 1, 1, *MOE, *resume, _ckpt(os.path.join(root, "F"), 2), "--max_iters", "4", ep=4)
    losses["P"] = run("P", 1, 2, *resume, _ckpt(os.path.join(root, "A"), 2), "--max_iters", "4", "--zero_stage", "1",
                      "--async_checkpoint", pp=2)
    losses["PR"] = run("PR", 1, 1, *resume, _ckpt(os.path.join(root, "P"), 4), "--max_iters", "6")
    losses["Q"] = run("Q", 1, 2, *MOE, "--max_iters", "4", "--checkpoint_format", "gathered", ep=2, pp=2)
    losses["QR"] = run("QR", 1, 2, *MOE, *resume, _ckpt(os.path.join(root, "Q"), 2), "--max_iters", "4", ep=2, pp=2)
    losses["L"] = run("L", 1, 2, *DEEP, "--max_iters", "6", pp=2)
    losses["L4"] = run("L4", 1, 4, *DEEP, *resume, _ckpt(os.path.join(root, "L"), 2), "--max_iters", "4", pp=4)
    losses["LV"] = run("LV", 2, 4, *DEEP, "--pipeline_schedule", "dualpipev", *resume,
                       _ckpt(os.path.join(root, "L4"), 4), "--max_iters", "6", pp=2, pipeline_schedule="dualpipev")
    losses["Z"] = run("Z", 1, 1, "--zero_stage", "1", "--max_iters", "4")
    losses["ZR"] = run("ZR", 2, 2, *resume, _ckpt(os.path.join(root, "Z"), 2), "--max_iters", "4")
    losses["AZ"] = run("AZ", 1, 1, "--zero_stage", "1", *resume, _ckpt(os.path.join(root, "A"), 2), "--max_iters", "4")
    return losses, files_a, _corrupt_resume(rank, root, run)


def _corrupt_resume(rank, root, run):
    import shutil

    import torch.distributed as dist

    from forge_dist.errors import CheckpointError

    bad = os.path.join(root, "X", "iter_0000006")
    if rank == 0:
        shutil.copytree(_ckpt(os.path.join(root, "B"), 6), bad)
        shard = os.path.join(bad, "model", "dcp", "__3_0.distcp")
        data = bytearray(open(shard, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    dist.barrier()
    try:
        run("X", 2, 2, "--init_from", "resume", "--init_from_ckpt", bad, "--max_iters", "8")
    except CheckpointError as e:
        return str(e)
    return None


def _assert_stage_ranks_wrote_their_stages(path):
    """PP=2 x DP=2 (ranks 0, 1: stage 0, layer 0 and the tied table; ranks 2, 3: stage 1, layer 1,
    the final norm): every entry comes from a rank of the stage that holds it, the tied table from
    stage 0 only (its first holder), and every moment is there under the one-process name."""
    from forge_dist.io.dcp_storage import read_index

    index = read_index(os.path.join(path, "model", "dcp"))
    writers = {}
    for idx, info in index.storage_data.items():
        writers.setdefault(idx.fqn, set()).add(int(info.relative_path.split("_")[2]))
    assert "model/lm_head.weight" not in writers and "optim/transformer.wte.weight/exp_avg" in writers
    for fqn, ranks in writers.items():
        stage1 = ".h.1." in fqn or "ln_f" in fqn
        assert ranks <= ({2, 3} if stage1 else {0, 1}), (fqn, ranks)


@pytest.mark.timeout(330)
def test_sharded_checkpoint_resumes_at_other_layouts(tmp_path):
    from forge_dist.io import from_pretrained
    from forge_dist.io.checkpoint_read import verify_checkpoint
    from forge_dist.testing.runs import fit, logged_losses
    from forge_dist.train.context import RunContext

    dataset = corpus_dataset(tmp_path, 20_000)
    root = str(tmp_path / "runs")
    per_rank = spawn(_worlds, 4, dataset, root, timeout=300, return_all=True)
    losses, files_a, _ = per_rank[0]
    for rank, (_, _, refused) in enumerate(per_rank):
        assert refused and "is corrupt: model/dcp/__3_0.distcp does not match its sha256" in refused, (rank, refused)
    # every rank wrote its own shard file (DCP spreads the deduplicated replicas over the ranks)
    assert files_a == [".metadata.json", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"], files_a
    fit([*ARGS, "--dataset", dataset, "--out_dir", os.path.join(root, "E"), "--gradient_accumulation_steps", "4",
         "--init_from", "resume", "--init_from_ckpt", _ckpt(os.path.join(root, "A"), 2), "--max_iters", "4"],
        RunContext())
    losses["E"] = logged_losses(os.path.join(root, "E"))
    fit([*ARGS, *MOE, "--dataset", dataset, "--out_dir", os.path.join(root, "H"), "--gradient_accumulation_steps", "4",
         "--init_from", "resume", "--init_from_ckpt", _ckpt(os.path.join(root, "F"), 2), "--max_iters", "4"],
        RunContext())
    losses["H"] = logged_losses(os.path.join(root, "H"))
    a, b = losses["A"], losses["B"]
    assert sorted(a) == [0, 1, 2, 3] and sorted(b) == [2, 3, 4, 5]
    for name, want, iters in (("B", a, (2, 3)), ("C", a, (2, 3)), ("E", a, (2, 3)), ("D", b, (4, 5)),
                              ("G", losses["F"], (2, 3)), ("H", losses["F"], (2, 3)), ("Z", a, (0, 1, 2, 3)),
                              ("ZR", losses["Z"], (2, 3)), ("AZ", a, (2, 3)), ("P", a, (2, 3)),
                              ("PR", b, (4, 5)), ("QR", losses["Q"], (2, 3)), ("L4", losses["L"], (2, 3)),
                              ("LV", losses["L"], (4, 5))):
        got = losses[name]
        assert set(iters) <= set(got) and min(got) == iters[0], (name, sorted(got))
        for i in iters:
            assert got[i] == pytest.approx(want[i], rel=REL), (name, i, got[i], want[i])
    # the sharded checkpoint reads back, with no world, as the weights each layout trained to
    final = {name: from_pretrained(os.path.join(_ckpt(os.path.join(root, name), 4 if name in "ACEP" else 6),
                                                "model")).state_dict() for name in ("A", "C", "D", "E", "P", "B", "PR")}
    for name, ref in (("C", "A"), ("E", "A"), ("P", "A"), ("PR", "B")):
        worst = max((final[name][k] - final[ref][k]).abs().max().item() for k in final[ref])
        assert worst < 1e-5, (name, worst)
    _assert_stage_ranks_wrote_their_stages(_ckpt(os.path.join(root, "P"), 4))
    from forge_dist.train.sharded_save import is_sharded_checkpoint

    deep = {name: from_pretrained(os.path.join(_ckpt(os.path.join(root, name), it), "model")).state_dict()
            for name, it in (("L", 4), ("L4", 4))}
    deep["L6"] = from_pretrained(os.path.join(_ckpt(os.path.join(root, "L"), 6), "model")).state_dict()
    deep["LV"] = from_pretrained(os.path.join(_ckpt(os.path.join(root, "LV"), 6), "model")).state_dict()
    assert is_sharded_checkpoint(_ckpt(os.path.join(root, "LV"), 6))  # the V shape's tied copies: sharded
    for name, ref in (("L4", "L"), ("LV", "L6")):
        worst = max((deep[name][k] - deep[ref][k]).abs().max().item() for k in deep[ref])
        assert worst < 1e-5, (name, worst)
    moe = {name: from_pretrained(os.path.join(_ckpt(os.path.join(root, name), 4), "model")).state_dict()
           for name in "FGH"}  # every expert, whatever EP size wrote it
    for name, atol in (("G", 1e-6), ("H", 1e-3)):  # H: one process's matmul shapes; an AdamW step of a
        # near-zero expert gradient turns rounding noise into up to ~lr (as tests/integration/test_expert_train.py)
        worst = max((moe[name][k] - moe["F"][k]).abs().max().item() for k in moe["F"])
        assert worst < atol, (name, worst)
    verify_checkpoint(_ckpt(os.path.join(root, "D"), 6))
    # the ZeRO-1 checkpoint holds every parameter's moments (each from its owner), as A's does
    from forge_dist.io.sharded_read import checkpoint_optimizer_state

    got, want = (checkpoint_optimizer_state(_ckpt(os.path.join(root, n), 2)) for n in ("Z", "A"))
    assert got["state"].keys() == want["state"].keys() and got["param_groups"] == want["param_groups"]
    for i, moments in want["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            a, b = got["state"][i][k], moments[k]
            assert ((a - b).norm() / b.norm()).item() < 1e-4, (i, k)

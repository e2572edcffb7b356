"""Every issue-4 model option trains through forge-train (in-process ``main``) on CPU in a tiny
model: quantization (schedule followed across a resume), MoE metrics, learned steering vectors
over --dataset_list, static steering vectors, cross-layer sharing, per-layer lists."""
import math

import numpy as np
import pytest

from forge_dist.data.loader import choose_dataset, normalized_probs
from forge_dist.train.cli import main
from forge_dist.train.metrics import read_metrics

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "1", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--seed", "1337"]
# a learning rate at which 16 steps visibly lower the loss of a 2-layer char model
FAST = ["--lr_scheduler", "none", "--learning_rate", "1e-2", "--max_iters", "16", "--eval_interval", "16",
        "--never_save_checkpoint"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small char datasets with one vocabulary (both texts carry the same alphabet line) but
    different text, and a third whose characters differ."""
    from forge_dist.data.prepare import CORPUS, prepare_text

    root = tmp_path_factory.mktemp("data")
    corpus = CORPUS.read_text(encoding="utf-8")
    texts = {"x": corpus[:12_000], "y": corpus[12_000:24_000][::-1]}
    alphabet = "".join(sorted(set(texts["x"]) | set(texts["y"])))
    for name, text in {**texts, "odd": "abc " * 500}.items():
        (root / f"{name}.txt").write_text((alphabet + "\n" if name != "odd" else "") + text, encoding="utf-8")
        prepare_text([root / f"{name}.txt"], root / name, tokenizer="char", val_fraction=0.1)
    return {name: str(root / name) for name in ("x", "y", "odd")}


def train(out_dir, *args):
    try:
        return main(TINY + ["--out_dir", str(out_dir), *args])
    except SystemExit as e:
        return e.code


def steps(out_dir):
    return [r for r in read_metrics(str(out_dir)) if "loss" in r]


def assert_trains(out_dir, falls=False):
    losses = [r["loss"] for r in steps(out_dir)]
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    if falls:  # mean of the last steps clearly below the first (ln 62 = 4.13 at init)
        assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.15, losses


# --- quantization ---------------------------------------------------------------------------------
QUANT = {
    "bitlinear_1p58": ["--linear_variant_attn", "bitlinear_1p58", "--linear_variant_mlp", "bitlinear_1p58"],
    "embeddings": ["--quantize_wte", "--quantize_wpe", "--quantize_wte_bits", "6", "--quantize_wpe_method",
                   "symmetric_quant"],
    "act_symmetric": ["--quantize_attn_act", "--quantize_mlp_act", "--activations_quant_method", "symmetric_quant"],
    "act_affine": ["--quantize_attn_act", "--quantize_mlp_act", "--activations_quant_method", "affine_quant",
                   "--quantize_attn_act_bits", "6"],
}


@pytest.mark.parametrize("name", list(QUANT))
def test_quantized_variants_train(data, tmp_path, name):
    assert train(tmp_path, "--dataset", data["x"], *FAST, *QUANT[name]) == 0
    assert_trains(tmp_path, falls=name != "bitlinear_1p58")
    if name.startswith("act"):  # no scheduler: every point fully quantized from the first step
        assert all(r["quant_level"] == {"activation": 1.0} for r in steps(tmp_path))
    if name == "embeddings":
        assert all(r["quant_level"] == {"embedding": 1.0} for r in steps(tmp_path))


def expected_level(it, warmup=2, full=4, start=0.05):
    """docs/options/quantization.md: linear schedule as upstream writes it, 0 during the warmup."""
    return 0.0 if it < warmup else min(it / full + full * start, 1.0)


def test_quant_schedule_and_dataset_choice_survive_a_resume(data, tmp_path):
    """quantized_linear (warmup 2, linear schedule) with LSV over two datasets: the levels follow
    the formula at every iteration, and a run resumed at iteration 3 logs the uninterrupted run's
    losses, levels, datasets and LSV indices."""
    common = ["--dataset_list", data["x"], data["y"], "--use_lsv", "--apply_lsv_at_layer_idx", "1",
              "--linear_variant_attn", "quantized_linear", "--linear_variant_mlp", "quantized_linear",
              "--quantization_warmup_iters", "2", "--quant_scheduler", "linear", "--full_quant_iteration", "4",
              "--start_quant_level", "0.05", "--eval_interval", "3", "--lr_scheduler", "none"]
    assert train(tmp_path / "full", *common, "--max_iters", "6") == 0
    assert train(tmp_path / "half", *common, "--max_iters", "3") == 0
    assert train(tmp_path / "half", "--init_from", "resume", "--max_iters", "6") == 0
    full, half = steps(tmp_path / "full"), steps(tmp_path / "half")
    assert [r["iter"] for r in half] == list(range(6))
    for a, b in zip(full, half):
        assert a["quant_level"] == b["quant_level"] == {"linear": expected_level(a["iter"])}
        assert a["loss"] == b["loss"]  # bit for bit
        assert a["dataset"] == b["dataset"] == a["lsv_index"] == b["lsv_index"]
    probs = normalized_probs(None, 2)
    assert [r["dataset"] for r in full] == [choose_dataset(1337, it, probs) for it in range(6)]
    assert {r["dataset"] for r in full} == {0, 1}  # the index really switches
    evals = [r for r in read_metrics(str(tmp_path / "half")) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6]
    for r in evals:  # per-dataset losses, the overall one their (uniform) mean
        assert r["val_loss"] == pytest.approx((r["val_loss/x"] + r["val_loss/y"]) / 2)


# --- mixture of experts ---------------------------------------------------------------------------
MOE = ["--use_moe", "--n_experts", "4", "--moe_top_k", "2"]


def test_moe_softmax_aux_z_capacity(data, tmp_path):
    assert train(tmp_path, "--dataset", data["x"], *FAST, *MOE, "--moe_aux_loss_coef", "0.01",
                 "--moe_z_loss_coef", "0.001", "--moe_capacity_factor", "1.0",
                 "--gradient_accumulation_steps", "2") == 0
    assert_trains(tmp_path, falls=True)
    routed = 2 * 4 * 32 * 2  # micro-batches x rows x tokens x top_k per step
    for r in steps(tmp_path):
        assert r["aux_loss"] > 0.01  # the load-balance term alone is >= coef on a near-uniform router
        (layer,) = r["tokens_per_expert"]  # layer 0 (moe_layer_freq 2)
        counts = r["tokens_per_expert"][layer]
        assert len(counts) == 4 and sum(counts) + r["dropped_tokens"] == routed
        assert max(counts) <= 2 * math.ceil(1.0 * 4 * 32 * 2 / 4)  # capacity per micro-batch, 2 of them
        assert r["expert_share_min"] == pytest.approx(min(counts) / sum(counts))
        health = {k.rsplit("/", 1)[1]: v for k, v in r.items() if k.startswith(f"moe/{layer}/")}
        assert set(health) == {"router_entropy", "z_loss", "load_balance_loss", "dropped_fraction", "max_share"}
        assert 0 < health["router_entropy"] <= math.log(4) + 1e-6 and health["z_loss"] > 0
        assert r["aux_loss"] == pytest.approx(0.01 * health["load_balance_loss"] + 0.001 * health["z_loss"], rel=1e-4)
        assert health["dropped_fraction"] == pytest.approx(r["dropped_tokens"] / routed)
        assert health["max_share"] == pytest.approx(r["expert_share_max"])


def test_moe_noisy_router_logs_ce_and_evaluates_without_aux(data, tmp_path):
    assert train(tmp_path, "--dataset", data["x"], *FAST, *MOE, "--moe_router_scheme", "noisy_top_k",
                 "--moe_aux_loss_coef", "5.0") == 0
    assert_trains(tmp_path)
    first = steps(tmp_path)[0]
    # iteration 0: the evaluation and the step see the same weights; both report cross-entropy
    # near ln(vocab), while the auxiliary loss backpropagated with it is large
    assert abs(first["train_loss"] - first["loss"]) < 0.1 < 1.0 < first["aux_loss"]
    assert "dropped_tokens" not in first  # dropless without a capacity factor


# --- steering vectors, sharing, per-layer lists -------------------------------------------------------
def test_static_steering_vector_applied_and_obtained(data, tmp_path):
    vector = tmp_path / "push.npy"
    np.save(vector, np.linspace(-1, 1, 32, dtype=np.float32))
    obtained = tmp_path / "obtained.npy"
    assert train(tmp_path / "out", "--dataset", data["x"], *FAST, "--apply_vector_at_layer_idx", "1",
                 "--apply_vector_file", str(vector), "--apply_vector_scaling_factor", "0.5",
                 "--obtain_vector_at_layer_idx", "2", "--obtain_vector_file", str(obtained)) == 0
    assert_trains(tmp_path / "out", falls=True)
    got = np.load(obtained, allow_pickle=False)
    assert got.shape == (32,) and np.all(np.isfinite(got)) and np.abs(got).sum() > 0


def test_cross_layer_sharing_trains_one_module(data, tmp_path):
    from forge_dist import from_pretrained
    from forge_dist.train import checkpoint as ckpt

    assert train(tmp_path, "--dataset", data["x"], *FAST, "--no-never_save_checkpoint", "--shared_attn_size", "2",
                 "--shared_mlp_sym") == 0
    assert_trains(tmp_path, falls=True)
    h = from_pretrained(f"{ckpt.resolve_checkpoint(str(tmp_path))}/{ckpt.MODEL_DIR}").transformer.h
    assert h[0].attn is h[1].attn and h[0].mlp is h[1].mlp  # 2 layers: sym mirrors layer 0 onto 1


def test_per_layer_lists_with_infinite_attention(data, tmp_path):
    assert train(tmp_path, "--dataset", data["x"], *FAST, "--attention_variant", "infinite",
                 "--n_head_layerlist", "4", "3", "--n_qk_head_dim_layerlist", "8", "12",
                 "--n_v_head_dim_layerlist", "8", "6", "--mlp_size_layerlist", "48", "64") == 0
    assert_trains(tmp_path, falls=True)


# --- multi-dataset input errors -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tokenizer", "lsv_count", "probs", "both"])
def test_dataset_list_refuses_bad_input(data, tmp_path, capsys, case):
    args = {
        "tokenizer": ["--dataset_list", data["x"], data["odd"]],
        "lsv_count": ["--dataset_list", data["x"], data["y"], "--use_lsv", "--apply_lsv_at_layer_idx", "0",
                      "--lsv_dataset_num", "3"],
        "probs": ["--dataset_list", data["x"], data["y"], "--dataset_sampling_probs", "1"],
        "both": ["--dataset", data["x"], "--dataset_list", data["x"], data["y"]],
    }[case]
    assert train(tmp_path, *args, "--max_iters", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    expect = {"tokenizer": [data["x"], data["odd"], "tokenizer"], "lsv_count": ["lsv_dataset_num=3", "2 datasets"],
              "probs": ["1 values", "2 datasets"], "both": ["--dataset", "--dataset_list"]}[case]
    assert all(e in err for e in expect), err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_dataset_sampling_probs_weight_the_choice(data, tmp_path):
    assert train(tmp_path, "--dataset_list", data["x"], data["y"], "--dataset_sampling_probs", "0", "1",
                 "--max_iters", "4", "--eval_interval", "4", "--never_save_checkpoint") == 0
    assert [r["dataset"] for r in steps(tmp_path)] == [1, 1, 1, 1]
    last = read_metrics(str(tmp_path))[-1]
    assert last["val_loss"] == pytest.approx(last["val_loss/y"])  # weighted by the probabilities


# --- data parallelism ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_replicas_pick_the_same_datasets_and_sum_expert_counts(data, tmp_path):
    """torchrun, 2 data-parallel replicas of batch 2 against one process of batch 4: the same
    dataset and LSV index per iteration, the same losses and quant levels, and the per-expert
    counts of the whole global batch (z-loss only: a per-token mean, so the replicas' average
    equals the one-process loss; the load-balance term is per batch and would not)."""
    import os
    import subprocess
    import sys

    from forge_dist.testing.spawn import free_port

    common = ["--dataset_list", data["x"], data["y"], "--use_lsv", "--apply_lsv_at_layer_idx", "2", *MOE,
              "--moe_z_loss_coef", "0.001", "--linear_variant_mlp", "quantized_linear", "--quant_scheduler",
              "linear", "--full_quant_iteration", "4", "--quantization_warmup_iters", "1", "--max_iters", "6",
              "--eval_interval", "6", "--lr_scheduler", "none", "--never_save_checkpoint", "--dropout", "0.0"]
    args = TINY + common  # with --batch_size 2 per replica (the last value given wins)
    assert train(tmp_path / "one", *common) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(FORGE_OPS="reference", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "forge_dist.train", *args, "--batch_size", "2", "--out_dir", str(tmp_path / "dp2")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    one, dp2 = steps(tmp_path / "one"), steps(tmp_path / "dp2")
    assert [r["iter"] for r in dp2] == list(range(6))
    for a, b in zip(one, dp2):
        assert a["dataset"] == b["dataset"] == a["lsv_index"] == b["lsv_index"]
        assert a["quant_level"] == b["quant_level"]
        assert a["tokens_per_expert"] == b["tokens_per_expert"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-4)
    assert {r["dataset"] for r in one} == {0, 1}

"""KV-cached generation against the uncached path, forge-sample and forge-eval end to end."""
import json
import math

import pytest
import torch

from forge_dist.inference.generate import cut_at_stop, generate, next_token_probs
from forge_dist.inference import evaluate as eval_cli
from forge_dist.inference import sample as sample_cli
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.cli import main as train_main
from forge_dist.train.metrics import read_metrics
from forge_dist.testing.data import corpus_dataset


def _model(config, seed=0):
    from forge_dist.model.gpt import GPT

    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kv_cache_gives_the_uncached_tokens(tiny_config, positions):
    cfg = tiny_config if positions == "learned" else tiny_config.replace(use_abs_pos_embeddings=False,
                                                                        use_rotary_embeddings=True)
    model = _model(cfg)
    prompt = [3, 1, 4, 1, 5]
    n = 40  # well past block_size=16: the window slides and the cache restarts
    greedy = [generate(model, prompt, n, temperature=0, use_cache=c) for c in (True, False)]
    assert greedy[0] == greedy[1] and len(greedy[0]) == n
    sampled = [generate(model, prompt, n, temperature=1.0, top_k=20, use_cache=c,
                        generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != greedy[0]  # the seed drives real sampling


def test_prompt_longer_than_the_window(tiny_config):
    model = _model(tiny_config)
    prompt = list(range(30))
    assert generate(model, prompt, 5, temperature=0, use_cache=True) == generate(model, prompt, 5, temperature=0,
                                                                                 use_cache=False)


def test_top_k_and_output_normalizer():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = next_token_probs(logits, temperature=1.0, top_k=2)
    assert (probs[0, 2:] == 0).all() and probs[0, 0] > probs[0, 1] > 0

    class HalfRelu(torch.nn.Module):  # a stand-in output normaliser: relu(x) / 2, unnormalised
        def forward(self, scores, mask):
            assert scores.shape == (1, 1, 1, 4) and mask is None
            return torch.relu(scores) / 2

    probs = next_token_probs(logits, temperature=2.0, top_k=None, normalizer=HalfRelu())
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.0, 0.0]]))


def test_softmax_variant_output_is_used_for_sampling(tiny_config):
    from forge_dist.inference.generate import output_normalizer

    cfg = tiny_config.replace(softmax_variant_output="relumax")
    assert output_normalizer(tiny_config) is None and output_normalizer(cfg) is not None
    logits = torch.randn(1, 64)
    variant = next_token_probs(logits, 1.0, None, output_normalizer(cfg))
    assert not torch.allclose(variant / variant.sum(), torch.softmax(logits, -1))
    model = _model(cfg)
    runs = [generate(model, [1, 2], 24, temperature=1.0, top_k=10, use_cache=c,
                     generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert runs[0] == runs[1]


def test_stop_strings_cut_the_text():
    assert cut_at_stop("the fox. The end", ["The end", "zzz"]) == "the fox. "
    assert cut_at_stop("no stop here", ["zzz"]) == "no stop here"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    data = corpus_dataset(root, 30_000, name="data")
    out = root / "out"
    assert train_main(["--dataset", data, "--out_dir", str(out), "--n_layer", "2", "--n_head", "2",
                       "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--max_iters", "6",
                       "--eval_interval", "3", "--eval_iters", "3", "--device", "cpu", "--max_sample_tokens",
                       "none", "--no-tensorboard_log", "--no-progress", "--seed", "11"]) == 0
    return out


def _run(cli, argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().out


def test_forge_sample_cached_equals_uncached(run_dir, capsys):
    argv = ["--out_dir", str(run_dir), "--start", "THE ", "--max_new_tokens", "60", "--temperature", "0",
            "--device", "cpu"]
    code, cached = _run(sample_cli, argv, capsys)
    assert code == 0 and cached.startswith("THE ")
    _, uncached = _run(sample_cli, argv + ["--no-kv_cache"], capsys)
    assert cached == uncached


def test_forge_sample_prompt_file_stop_and_counts(run_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A fox ")
    code, out = _run(sample_cli, ["--out_dir", str(run_dir), "--start", f"FILE:{prompt}", "--num_samples", "2",
                                  "--top_k", "5", "none", "--max_new_tokens", "30", "--stop_strings", "e",
                                  "--device", "cpu"], capsys)
    samples = out.split("---------------\n")[:-1]
    assert code == 0 and len(samples) == 4  # 2 samples for each of 2 top_k values
    assert all(s.startswith("A fox ") and "e" not in s[len("A fox "):] for s in samples)


def test_forge_sample_reads_a_reallm_forge_ckpt(run_dir, tmp_path, capsys):
    from forge_dist.io import from_pretrained, save_ckpt

    model = from_pretrained(ckpt.resolve_checkpoint(str(run_dir)) + "/model")
    save_ckpt(model, str(tmp_path))
    data = str(run_dir.parent / "data")
    argv = ["--start", "THE ", "--max_new_tokens", "20", "--temperature", "0", "--device", "cpu"]
    _, ours = _run(sample_cli, argv + ["--out_dir", str(run_dir)], capsys)
    _, theirs = _run(sample_cli, argv + ["--out_dir", str(tmp_path / "ckpt.pt"), "--dataset", data], capsys)
    assert ours == theirs


def test_forge_eval_perplexity_is_exp_loss(run_dir, capsys):
    code, out = _run(eval_cli, ["--out_dir", str(run_dir), "--eval_iters", "3", "--json", "--device", "cpu"], capsys)
    result = json.loads(out)
    assert code == 0 and result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    logged = [r["val_loss"] for r in read_metrics(str(run_dir)) if "val_loss" in r][-1]
    assert result["loss"] == logged  # the same batches as the run's last evaluation
    _, text = _run(eval_cli, ["--out_dir", str(run_dir), "--eval_iters", "3", "--device", "cpu"], capsys)
    assert text.startswith(f"val loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}")


@pytest.mark.parametrize("cli,argv,message", [
    (sample_cli, ["--out_dir", "no/such/dir"], "does not exist"),
    (eval_cli, ["--out_dir", "no/such/dir"], "does not exist"),
    (sample_cli, ["--temperature", "hot"], "invalid float value"),
    (eval_cli, ["--eval_iters", "0"], "must be at least 1"),
    (sample_cli, ["--device", "cpu", "--dtype", "float16"], "bfloat16"),
])
def test_bad_input_exits_2_with_one_line(cli, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_eval_refuses_a_dataset_with_a_larger_vocabulary(run_dir, tmp_path, capsys):
    from forge_dist.data.prepare import prepare_text

    (tmp_path / "t.txt").write_text("".join(chr(c) for c in range(0x3b1, 0x3b1 + 150)) * 10, encoding="utf-8")
    prepare_text([tmp_path / "t.txt"], tmp_path / "wide", tokenizer="char", val_fraction=0.2)
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--out_dir", str(run_dir), "--dataset", str(tmp_path / "wide"), "--device", "cpu"])
    assert e.value.code == 2 and "vocab mismatch" in capsys.readouterr().err

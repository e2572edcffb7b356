"""forge-train fine-tunes a transformers directory directly, with its tokenizer: the data is
prepared with ``forge-prepare --tokenizer_from HF_DIR``, and ``--init_from prev_run
--prev_run_ckpt HF_DIR`` under TP=2 (torchrun) logs the one-process losses and writes the same
weights."""
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
import transformers  # noqa: E402  (requirements-cpu.txt)

from forge_dist.data.prepare import CORPUS  # noqa: E402
from forge_dist.data.prepare import main as prepare_main  # noqa: E402
from forge_dist.testing.hf import hf_bpe_tokenizer  # noqa: E402
from test_parallel_train import assert_close_series, assert_weights_close, series, single, torchrun, weights  # noqa: E402,I100

pytestmark = pytest.mark.slow

RUN = ["--batch_size", "4", "--gradient_accumulation_steps", "1", "--eval_interval", "4", "--eval_iters", "1",
       "--log_interval", "1", "--device", "cpu", "--dtype", "float32", "--no-tensorboard_log", "--no-progress",
       "--max_sample_tokens", "none", "--max_iters", "4", "--learning_rate", "1e-3", "--init_from", "prev_run"]


def test_finetune_an_imported_llama_under_tp2_equals_one_process(tmp_path):
    text = CORPUS.read_text(encoding="utf-8")[:20_000]
    tokenizer = hf_bpe_tokenizer(text)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    dataset = str(tmp_path / "data")
    assert prepare_main(["--input", str(tmp_path / "in.txt"), "--out_dir", dataset, "--tokenizer_from",
                         str(tmp_path / "hf")]) == 0
    common = [*RUN, "--prev_run_ckpt", str(tmp_path / "hf"), "--dataset", dataset]

    proc = single(*common, "--out_dir", str(tmp_path / "one"))
    assert f"initialised from {tmp_path / 'hf'}" in proc.stdout + proc.stderr
    torchrun(2, *common, "--out_dir", str(tmp_path / "tp2"), "--tensor_parallel_size", "2")
    one, tp2 = series(tmp_path / "one"), series(tmp_path / "tp2")
    assert_close_series(tp2, one, 1e-5, range(4))
    from forge_dist.io import from_pretrained

    imported = from_pretrained(tmp_path / "hf").state_dict()["transformer.wte.weight"]
    assert not torch.equal(weights(tmp_path / "one")["transformer.wte.weight"], imported)  # it trained
    assert_weights_close(weights(tmp_path / "tp2"), weights(tmp_path / "one"), 1e-5)

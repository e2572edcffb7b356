"""forge-train --deepspeed_config --pipeline_parallel_size 2 end to end: under torchrun it logs the
losses, grad norms and validation losses of one process (the native engine, same flags) to 1e-5,
samples once (the stages' weights gathered to rank 0), and its checkpoint resumes in one process
on forge_dist's own engine (weights from model/, AdamW moments from optimizer.*), continuing as the
uninterrupted run. The numerics, and the resume under DeepSpeed at PP=1, are
tests/dist/test_deepspeed_pipeline.py's."""
import os

import pytest

from test_parallel_train import assert_close_series, assert_weights_close, series, single, torchrun, weights

pytestmark = pytest.mark.slow

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "deepspeed",
                      "zero1_fp32.json")
RUN = ["--n_layer", "3", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--dropout", "0.0",
       "--batch_size", "4", "--gradient_accumulation_steps", "2", "--eval_interval", "2", "--eval_iters", "2",
       "--log_interval", "1", "--device", "cpu", "--dtype", "float32", "--no-tensorboard_log", "--no-progress",
       "--always_save_checkpoint", "--max_iters", "4", "--grad_clip", "0.5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from forge_dist.data.prepare import prepare_default_dataset

    return str(prepare_default_dataset(tmp_path_factory.mktemp("cache")))


@pytest.mark.timeout(300)
def test_deepspeed_pp2_matches_one_process_and_resumes_on_the_native_engine(corpus, tmp_path):
    ref, pp2, resumed = tmp_path / "ref", tmp_path / "pp2", tmp_path / "resumed"
    single(*RUN, "--dataset", corpus, "--out_dir", str(ref), "--max_sample_tokens", "none")
    proc = torchrun(2, *RUN, "--dataset", corpus, "--pipeline_parallel_size", "2", "--deepspeed_config", CONFIG,
                    "--out_dir", str(pp2), "--max_sample_tokens", "8", timeout=240)
    assert proc.stdout.count("--- sample ---") == 1
    for key, iters in (("loss", range(4)), ("grad_norm", range(4)), ("val_loss", (0, 2, 4))):
        assert_close_series(series(pp2, key), series(ref, key), 1e-5, iters)
    assert_weights_close(weights(pp2), weights(ref), 1e-5)
    single(*RUN, "--dataset", corpus, "--out_dir", str(resumed), "--init_from", "resume",
           "--init_from_ckpt", os.path.join(pp2, "checkpoints", "iter_0000002"), "--max_sample_tokens", "none")
    want = {i: v for i, v in series(ref).items() if i >= 2}
    assert_close_series(series(resumed), want, 1e-5, range(2, 4))
    assert_weights_close(weights(resumed), weights(ref), 1e-5)

"""--checkpoint_format / --async_checkpoint refusals (before any process group) and which format a
run writes (forge_dist.train.sharded_save)."""
import pytest

from forge_dist.errors import ConfigError
from forge_dist.train.context import RunContext
from forge_dist.train.options import TrainConfig
from forge_dist.train.sharded_save import check_checkpoint_options, checkpointer_for


def test_refusals_name_the_option():
    with pytest.raises(ConfigError, match="needs checkpoint_format=sharded"):
        check_checkpoint_options({"checkpoint_format": "gathered", "async_checkpoint": True})


def test_every_engine_and_layout_writes_and_resumes_the_sharded_format(tmp_path):
    (tmp_path / "model" / "dcp").mkdir(parents=True)
    (tmp_path / "model" / "dcp" / ".metadata.json").write_text("{}")
    for pp, ep in ((1, 1), (2, 1), (1, 2), (1, 4)):  # DeepSpeed's engines, experts included
        check_checkpoint_options({"deepspeed_config": "ds.json", "checkpoint_format": "sharded",
                                  "async_checkpoint": True, "pipeline_parallel_size": pp,
                                  "expert_parallel_size": ep})
    check_checkpoint_options({"pipeline_parallel_size": 2, "checkpoint_format": "sharded"})


class _Engine:
    def __init__(self, name, ep=1):
        self.name, self.ep = name, ep


@pytest.mark.parametrize("fmt, world, engine, asynchronous, sharded", [
    ("auto", 1, _Engine("local"), False, False),      # one process: one plain safetensors file
    ("auto", 1, _Engine("local"), True, True),         # --async_checkpoint: the sharded writer
    ("auto", 4, _Engine("parallel"), False, True),     # a launched run: every rank its own shards
    ("auto", 4, _Engine("parallel", ep=2), False, True),  # experts under their global names
    ("auto", 4, _Engine("pipeline"), False, True),     # each stage rank its stages' shards (the V shape's
    # tied copies too: tests/dist/test_sharded_resume.py's LV run)
    ("auto", 4, _Engine("deepspeed"), False, True),   # DeepSpeed: its ZeRO partitions
    ("auto", 4, _Engine("deepspeed", ep=2), False, True),  # with experts: each rank its own
    ("auto", 1, _Engine("deepspeed"), False, False),  # one process: gathered
    ("sharded", 1, _Engine("local"), False, True),
    ("gathered", 4, _Engine("parallel"), False, False),
])
def test_which_format_a_run_writes(fmt, world, engine, asynchronous, sharded):
    cfg = TrainConfig(checkpoint_format=fmt, async_checkpoint=asynchronous)
    ctx = RunContext(rank=0, world_size=world, dp_rank=0, dp_size=world)
    assert (checkpointer_for(cfg, ctx, engine) is not None) == sharded


def test_rank_0_publishes_only_what_it_can_see(tmp_path):
    """An out_dir that is not shared by every node: rank 0 cannot see a file another rank wrote, so
    nothing is published and the reason names the rank, the file and the fix."""
    from forge_dist.io.checkpoint_read import read_pointer, verify_checkpoint
    from forge_dist.train.sharded_save import seal_and_publish

    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-iter_0000002"
    (tmp / "model" / "dcp").mkdir(parents=True)
    (tmp / "model" / "dcp" / "__0_0.distcp").write_bytes(b"rank 0")
    mine = {"model/dcp/__0_0.distcp": ("0" * 64, 6)}
    other = {"model/dcp/__1_0.distcp": ("1" * 64, 6)}
    publish = dict(root=str(root), tmp=str(tmp), final=str(root / "iter_0000002"), name="iter_0000002",
                   iteration=2, is_best=False, keep=2)
    problem = seal_and_publish([mine, other], publish)
    assert "rank 1 wrote model/dcp/__1_0.distcp, which rank 0 cannot see" in problem
    assert "filesystem every node shares" in problem
    assert read_pointer(str(root)) is None and tmp.is_dir()
    (tmp / "model" / "dcp" / "__1_0.distcp").write_bytes(b"rank 1")
    import hashlib

    digest = {f: (hashlib.sha256(b"rank %d" % i).hexdigest(), 6) for i, f in enumerate(list(mine) + list(other))}
    assert seal_and_publish([{f: digest[f]} for f in digest], publish) is None
    assert read_pointer(str(root)) == "iter_0000002"
    manifest = verify_checkpoint(str(root / "iter_0000002"))
    assert manifest["sharded"] and manifest["sizes"]["model/dcp/__1_0.distcp"] == 6

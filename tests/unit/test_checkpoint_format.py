"""--checkpoint_format / --async_checkpoint refusals (before any process group) and which format a
run writes (forge_dist.train.sharded_save)."""
import pytest

from forge_dist.errors import ConfigError
from forge_dist.train.context import RunContext
from forge_dist.train.options import TrainConfig
from forge_dist.train.sharded_save import check_checkpoint_options, checkpointer_for


@pytest.mark.parametrize("values, match", [
    ({"checkpoint_format": "sharded", "pipeline_parallel_size": 2}, "checkpoint_format=sharded is not supported with "
                                                                     "pipeline_parallel_size=2"),
    ({"checkpoint_format": "sharded", "expert_parallel_size": 2}, "expert_parallel_size=2"),
    ({"async_checkpoint": True, "deepspeed_config": "ds.json"}, "--async_checkpoint is not supported with "
                                                                  "--deepspeed_config"),
    ({"checkpoint_format": "gathered", "async_checkpoint": True}, "needs checkpoint_format=sharded"),
])
def test_refusals_name_the_option(values, match):
    with pytest.raises(ConfigError, match=match):
        check_checkpoint_options(values, None)


def test_a_sharded_checkpoint_is_not_resumed_by_an_engine_that_cannot_read_it(tmp_path):
    (tmp_path / "model" / "dcp").mkdir(parents=True)
    (tmp_path / "model" / "dcp" / ".metadata.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a sharded checkpoint, which pipeline_parallel_size=2 cannot resume"):
        check_checkpoint_options({"pipeline_parallel_size": 2}, str(tmp_path))
    check_checkpoint_options({"pipeline_parallel_size": 2}, str(tmp_path / "elsewhere"))  # gathered: fine


class _Engine:
    def __init__(self, name, ep=1):
        self.name, self.ep = name, ep


@pytest.mark.parametrize("fmt, world, engine, asynchronous, sharded", [
    ("auto", 1, _Engine("local"), False, False),      # one process: one plain safetensors file
    ("auto", 1, _Engine("local"), True, True),         # --async_checkpoint: the sharded writer
    ("auto", 4, _Engine("parallel"), False, True),     # a launched run: every rank its own shards
    ("auto", 4, _Engine("parallel", ep=2), False, False),
    ("auto", 4, _Engine("pipeline"), False, False),
    ("sharded", 1, _Engine("local"), False, True),
    ("gathered", 4, _Engine("parallel"), False, False),
])
def test_which_format_a_run_writes(fmt, world, engine, asynchronous, sharded):
    cfg = TrainConfig(checkpoint_format=fmt, async_checkpoint=asynchronous)
    ctx = RunContext(rank=0, world_size=world, dp_rank=0, dp_size=world)
    assert (checkpointer_for(cfg, ctx, engine) is not None) == sharded

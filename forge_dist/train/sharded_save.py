"""Sharded training checkpoints (``--checkpoint_format sharded``): every rank writes only its own
shards of the model and AdamW state through torch.distributed.checkpoint (train/sharded_checkpoint.py),
published atomically like the gathered format (train/checkpoint.py)::

    iter_0000020/  model/config.json          the model's config (rank 0): from_pretrained reads model/
                   model/dcp/.metadata.json   DCP's index as JSON: logical names, shapes, chunks, files
                   model/dcp/__R_K.distcp     rank R's pieces: ``model/<name>``, ``optim/<name>/<moment>``
                   optimizer.json             scaler, engine, layout, parameter names and groups (rank 0)
                   trainer_state.json/...     iteration, loader position, schedule, every rank's RNG, options
                   manifest.json              sha256 of every file (each rank hashed its own shards)

Publish: every rank writes into ``.tmp-iter_N``; DCP's coordinator writes the index once every rank's
shards are written; each rank hashes the files it wrote and sends the digests to rank 0, which writes
the manifest, renames the directory into place and only then moves ``latest`` (and ``best``) and
prunes to ``keep_checkpoints``. A crash before that leaves the previous checkpoint as ``latest``.

``--async_checkpoint``: the state is copied to CPU memory at the save, and the writing, hashing and
publishing run in a background thread (their collectives on a process group of their own) while
training goes on; the next save, and the end of the run, wait for it (a failure surfaces there).

DeepSpeed's engines write the same entries from their ZeRO partitions (engine.sharded_state:
train/deepspeed_sharded.py), so either engine resumes the other's checkpoint.

Resume (load_engine_state): each rank asks DCP for the pieces of its current layout, which
reshards across tensor-, data- and pipeline-parallel sizes (pipeline stages name their tensors by
the one-process GPT: parallel/pipeline/stage.py LocalStages.logical_tensors); before reading, it
verifies the sha256 of only the files those pieces come from, and all ranks agree before any reads,
so a corrupt file is refused by name on every rank.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

import torch.distributed as dist

from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.io.checkpoint_read import MODEL_DIR, checkpoint_name, verify_files
from forge_dist.io.sharded_read import DCP_DIR, dcp_directory, is_sharded_model_dir
from forge_dist.io.statefile import load_state, save_state

SHARDED_ENGINES = ("local", "parallel", "pipeline", "deepspeed")  # DeepSpeed's: train/deepspeed_sharded.py


def is_sharded_checkpoint(path: str) -> bool:
    return is_sharded_model_dir(os.path.join(path, MODEL_DIR))


def check_checkpoint_options(values: dict) -> None:
    """Before any process group: --checkpoint_format / --async_checkpoint (every engine and layout
    writes and reads the sharded format)."""
    if values.get("checkpoint_format", "auto") == "gathered" and values.get("async_checkpoint"):
        raise ConfigError("--async_checkpoint needs checkpoint_format=sharded (or auto): the gathered format "
                          "is written synchronously")


def checkpointer_for(train_cfg, ctx, engine) -> Optional["ShardedCheckpointer"]:
    """The sharded checkpointer this run saves with, or None for the gathered format. ``auto``:
    sharded for a launched run of several ranks (no rank gathers the model), gathered for one process
    (one file set that any tool reads as is), unless --async_checkpoint asks for the sharded one."""
    fmt = getattr(train_cfg, "checkpoint_format", "auto")
    asynchronous = bool(getattr(train_cfg, "async_checkpoint", False))
    supported = getattr(engine, "name", None) in SHARDED_ENGINES
    sharded = fmt == "sharded" or (fmt == "auto" and (ctx.world_size > 1 or asynchronous))
    return ShardedCheckpointer(ctx, asynchronous) if sharded and supported else None


class ShardedCheckpointer:
    def __init__(self, ctx, asynchronous: bool = False):
        self.ctx, self.asynchronous = ctx, asynchronous
        self._pending: Optional[Future] = None
        self._pending_iteration: Optional[int] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._group = None  # the async saves' own process group (created at the first, by every rank)

    def save(self, root: str, iteration: int, model, engine, trainer_state: dict, keep: int = 2,
             is_best: bool = False) -> str:
        """Collective: write this rank's shards (all ranks), publish (rank 0); the final path."""
        from forge_dist.io.forge_format import save_config
        from forge_dist.train.checkpoint import weights_training_info
        from forge_dist.train.sharded_checkpoint import async_save_sharded, save_sharded

        self.wait()
        ctx, name = self.ctx, checkpoint_name(iteration)
        tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
        model_dir = os.path.join(tmp, MODEL_DIR)
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(dcp_directory(model_dir))
            save_config(model.config, model_dir, weights_training_info(iteration, trainer_state))
            save_state(trainer_state, tmp, "trainer_state")
            names, param_groups = optimizer_layout(engine)
            meta = engine.sharded_meta() if hasattr(engine, "sharded_meta") else {"scaler": engine.scaler.state_dict()}
            save_state({"format": "sharded", **meta, "engine": engine.name, "layout": ctx.layout(),
                        "param_names": names, "param_groups": param_groups}, tmp, "optimizer")
        ctx.barrier()
        groups = getattr(engine, "groups", None)
        own = engine.sharded_state(writing=True) if hasattr(engine, "sharded_state") else None  # DeepSpeed's
        optimizer = getattr(engine, "optimizer", None)
        publish = dict(root=root, tmp=tmp, final=final, name=name, iteration=iteration, is_best=is_best, keep=keep)
        if not self.asynchronous:
            files = save_sharded(dcp_directory(model_dir), engine.model, optimizer, groups, process_group=ctx.group,
                                 state=own)
            self._publish(files, ctx.group, publish)
            ctx.barrier()
            return final
        if ctx.distributed and self._group is None:
            self._group = dist.new_group(backend="gloo")
        future, writer = async_save_sharded(dcp_directory(model_dir), engine.model, optimizer, groups,
                                            process_group=self._group, state=own)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-async-ckpt")

        def finish():
            future.result()
            self._publish(writer.files_written, self._group, publish)

        self._pending, self._pending_iteration = self._executor.submit(finish), iteration
        return final

    def _publish(self, files: List[str], group, publish: dict) -> None:
        """Hash this rank's files, send the digests to rank 0, which seals and publishes."""
        from forge_dist.io.checkpoint_read import _sha256

        tmp = publish["tmp"]
        rel = [os.path.join(MODEL_DIR, DCP_DIR, f) for f in files]
        mine = {f: (_sha256(os.path.join(tmp, f)), os.path.getsize(os.path.join(tmp, f))) for f in rel}
        if dist.is_initialized():
            everyone: Optional[list] = [None] * dist.get_world_size(group) if self.ctx.is_main else None
            dist.gather_object(mine, everyone, dst=0, group=group)
        else:
            everyone = [mine]
        problem = seal_and_publish(everyone, publish) if self.ctx.is_main else None
        if dist.is_initialized():  # every rank learns whether rank 0 published
            box = [problem]
            dist.broadcast_object_list(box, src=0, group=group)
            problem = box[0]
        if problem is not None:
            raise CheckpointError(problem)

    @property
    def pending_iteration(self) -> Optional[int]:
        return self._pending_iteration

    def wait(self) -> None:
        """Collective: the async save in flight is published on every rank (or its error raised)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.result()
        self._pending_iteration = None
        self.ctx.barrier()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def seal_and_publish(everyone: List[Dict[str, tuple]], publish: dict) -> Optional[str]:
    """Rank 0: the manifest from every rank's {file: (sha256, size)}, then the atomic publish
    (train.checkpoint._commit); or, when a file another rank wrote is not visible here (an out_dir
    that is not shared by every node), nothing published and the reason returned."""
    from forge_dist.train.checkpoint import _commit

    tmp, known = publish["tmp"], {}
    for rank, part in enumerate(everyone):
        unseen = [f for f in part if not os.path.isfile(os.path.join(tmp, f))]
        if unseen:
            return (f"saving {publish['name']} failed: rank {rank} wrote {unseen[0]}, which rank 0 cannot see in "
                    f"{tmp}; out_dir must be a filesystem every node shares (NFS, Lustre, ...); the previous "
                    f"checkpoint stays the latest")
        known.update(part)
    _commit(publish["root"], tmp, publish["final"], publish["name"], publish["iteration"], publish["is_best"],
            publish["keep"], known={f: h for f, (h, _) in known.items()},
            extra={"sharded": True, "sizes": {f: s for f, (_, s) in known.items()}})
    return None


def optimizer_layout(engine):
    """(parameter names, param_groups) of one process's optimizer, whatever the layout (placed
    experts listed as every expert under its global index): what optimizer.json records."""
    from forge_dist.parallel.expert.state import one_process_groups
    from forge_dist.parallel.zero import group_layout
    from forge_dist.train.sharded_checkpoint import param_names

    if hasattr(engine, "optimizer_layout"):  # pipeline stages: the one-process order of the whole model
        return engine.optimizer_layout()
    names = param_names(engine.model, engine.optimizer)  # a ZeRO-1 optimizer's groups hold every parameter
    return one_process_groups(group_layout(engine.optimizer), names, engine.model)


# --- resume ---------------------------------------------------------------------------------------
def load_engine_state(engine, path: str, groups) -> None:
    """Fill engine.model and engine.optimizer from the sharded checkpoint at ``path`` (any tensor-
    or data-parallel layout), and the scaler and optimizer hyperparameters from optimizer.json."""
    from forge_dist.train.sharded_checkpoint import load_sharded

    verify = lambda files: _verify_agreed(path, [os.path.join(MODEL_DIR, DCP_DIR, f) for f in files])  # noqa: E731
    if hasattr(engine, "load_sharded_state"):  # DeepSpeed: its partitions (train/deepspeed_sharded.py)
        engine.load_sharded_state(path, verify)
        return
    if engine.name not in SHARDED_ENGINES:
        raise CheckpointError(f"{path} is a sharded checkpoint; the {engine.name} engine cannot resume one yet")
    extra = load_state(path, "optimizer", map_location="cpu")
    names, _ = optimizer_layout(engine)
    if extra.get("param_names") != names or len(extra.get("param_groups", ())) != len(engine.optimizer.param_groups):
        raise CheckpointError(f"the optimizer state in {path} does not fit this run's optimizer (other parameters "
                              f"or parameter groups); keep the model options and weight_decay_split as they were, "
                              f"or start from the weights with --init_from prev_run")
    model_dir = os.path.join(path, MODEL_DIR)
    load_sharded(dcp_directory(model_dir), engine.model, engine.optimizer, groups, verify=verify)
    for group, saved in zip(engine.optimizer.param_groups, extra["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    if extra.get("scaler"):
        engine.scaler.load_state_dict(extra["scaler"])


class CorruptShards(CheckpointError):
    """A shard of the sharded checkpoint at ``path`` failed its sha256 on some rank (every rank
    raises it, so a resume that named no checkpoint can fall back together: recovery.py)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def _verify_agreed(path: str, files: List[str]) -> None:
    """This rank's files against the manifest; every rank learns of any failure before reading."""
    error = None
    try:
        verify_files(path, files)
    except CheckpointError as e:
        error = str(e)
    if dist.is_initialized():
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    else:
        errors = [error]
    bad = [(rank, e) for rank, e in enumerate(errors) if e]
    if bad:
        rank, message = bad[0]
        raise CorruptShards(message if error == message else f"{message} (found by rank {rank})", path)

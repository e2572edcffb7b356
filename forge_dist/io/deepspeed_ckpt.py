"""DeepSpeed checkpoints in forge_dist's terms: their layout file, and a consolidated copy of the
weights in our safetensors format under logical names.

forge-train's DeepSpeed engine saves with DeepSpeed's ``save_checkpoint`` into ``<ckpt>/deepspeed/``
and adds ``forge_layout.json`` there: the model configuration, the parallel layout (data-parallel
and tensor-parallel sizes, ZeRO stage, precision), the tag, and the ShardInfo of every tensor, which
is what a consolidation needs to put tensor-parallel shards back together.

``consolidate(path)`` rebuilds the fp32 weights from any ZeRO stage with DeepSpeed's own
``zero_to_fp32`` (``get_fp32_state_dict_from_zero_checkpoint``), once per model-parallel rank, with
every torch.load it makes forced to weights_only=True and our allow-list (deepspeed_safe.py: no
pickle runs, no GPU and any original world size): it
reads every ``*_optim_states.pt`` of a directory as data-parallel partitions of one model, so each
TP rank's files are shown to it alone (symbolic links renamed to model-parallel rank 00). The TP
shards are then joined with ``unshard`` and the result loads strictly into the plain GPT. Stage 0
in fp32 has no ZeRO partitions: its ``mp_rank_XX_model_states.pt`` holds the full fp32 module.

``forge-convert <ckpt> out --to forge`` (the training checkpoint, its deepspeed/ or a tag directory)
writes our model directory without consolidating: deepspeed_stream.py reads the same files
memory-mapped, one logical tensor at a time, and writes the same bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import re
import tempfile
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from forge_dist.errors import CheckpointError
from forge_dist.io.deepspeed_safe import safe_load, weights_only_loads

DS_DIR = "deepspeed"
LAYOUT_NAME = "forge_layout.json"
LAYOUT_FORMAT = "forge_dist.deepspeed_layout"
LOGICAL_FORMAT = "forge_dist.deepspeed_logical_optimizer"
LOGICAL_NAME = "deepspeed_logical"  # <training checkpoint>/deepspeed_logical.{json,safetensors}


# --- the layout file ------------------------------------------------------------------------------
def _latest_tag(ds_dir: str) -> str:
    try:
        with open(os.path.join(ds_dir, "latest"), encoding="utf-8") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{ds_dir} has no 'latest' file naming DeepSpeed's checkpoint tag") from None


def write_layout(ds_dir: str, model, layout: dict, global_steps: int) -> None:
    """Rank 0, after DeepSpeed's save_checkpoint (which wrote ``latest``): ``model`` is the module
    DeepSpeed trains (its config, the ShardInfo of every tensor, which names are tied)."""
    from forge_dist.parallel.tensor.metadata import shard_info

    state = model.state_dict(keep_vars=True)
    first: Dict[int, str] = {}
    for name, t in state.items():
        first.setdefault(id(t), name)
    meta = {"format": LAYOUT_FORMAT, "version": 1, "tag": _latest_tag(ds_dir), "global_steps": global_steps,
            "layout": layout, "model_config": model.config.to_dict(),
            "shards": {n: None if shard_info(t) is None else dataclasses.asdict(shard_info(t)) for n, t in state.items()},
            "aliases": {n: first[id(t)] for n, t in state.items() if first[id(t)] != n}}
    with open(os.path.join(ds_dir, LAYOUT_NAME), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)


def read_layout(ds_dir: str) -> dict:
    path = os.path.join(ds_dir, LAYOUT_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{ds_dir} has no {LAYOUT_NAME}: it was not written by forge-train's DeepSpeed "
                              f"engine (a checkpoint of a run without --deepspeed_config resumes without it)") from None
    except ValueError:
        raise CheckpointError(f"{path} is corrupt") from None
    if meta.get("format") != LAYOUT_FORMAT:
        raise CheckpointError(f"{path} is not a forge_dist DeepSpeed layout (format {meta.get('format')!r})")
    return meta


def shard_info(d: Optional[dict]):
    from forge_dist.parallel.tensor.metadata import ShardInfo

    if d is None:
        return None
    return ShardInfo(**{**d, "full_shape": tuple(d["full_shape"])})


# --- finding a DeepSpeed checkpoint ---------------------------------------------------------------
def _has_model_states(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "*model_states.pt")))


def locate(path: str) -> Optional[Tuple[str, str]]:
    """(DeepSpeed save directory, tag) for a save directory, one of its tag directories, or a
    forge-train checkpoint holding ``deepspeed/``; None when ``path`` is none of these."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    for ds_dir in (path, os.path.join(path, DS_DIR)):
        if os.path.isfile(os.path.join(ds_dir, LAYOUT_NAME)):
            return ds_dir, None
        try:  # DeepSpeed's own pointer (forge-train's checkpoints/latest names a directory without these)
            if _has_model_states(os.path.join(ds_dir, _latest_tag(ds_dir))):
                return ds_dir, None
        except CheckpointError:
            pass
    if _has_model_states(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    return None


def is_deepspeed_checkpoint(path: str) -> bool:
    return locate(path) is not None


# --- consolidation --------------------------------------------------------------------------------
def _mp_rank_view(tag_dir: str, mp_rank: int, view_root: str, tag: str) -> str:
    """A directory showing only model-parallel rank ``mp_rank``'s files, renamed to rank 00."""
    view = os.path.join(view_root, f"mp{mp_rank}", tag)
    os.makedirs(view)
    mine = f"mp_rank_{mp_rank:02d}"
    for f in os.listdir(tag_dir):
        if mine in f and f.endswith(".pt"):
            os.symlink(os.path.abspath(os.path.join(tag_dir, f)), os.path.join(view, f.replace(mine, "mp_rank_00")))
    return os.path.dirname(view)


def module_states(tag_dir: str, n_ranks: int, mmap: bool = False) -> list:
    """The ``module`` saved in each model-parallel rank's model-states file (stage 0: no ZeRO)."""
    out = []
    for t in range(n_ranks):
        file = os.path.join(tag_dir, f"mp_rank_{t:02d}_model_states.pt")
        try:
            out.append(safe_load(file, mmap=mmap)["module"])
        except (OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from None
    return out


def pipeline_states(tag_dir: str, tp: int, mmap: bool = False) -> dict:
    """A pipeline checkpoint's weights: DeepSpeed writes one ``layer_XX-model_states.pt`` per layer
    of the PipelineModule (``layer_XX-model_YY-...`` per TP rank), and forge-train's layers keep the
    GPT's names (train/deepspeed_pipeline.py). Under TP, TP rank 0's files: the logical copy then
    replaces every parameter (consolidate)."""
    files = sorted(glob.glob(os.path.join(tag_dir, "layer_*-model_00-model_states.pt" if tp > 1
                                          else "layer_*-model_states.pt")))
    if not files:
        raise CheckpointError(f"{tag_dir} is a pipeline checkpoint without layer_XX-model_states.pt files")
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for file in files:
        try:
            state.update(safe_load(file, mmap=mmap))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from None
    return state


def _zero_states(tag_dir: str, tag: str, n_ranks: int) -> list:
    """zero_to_fp32's fp32 state dict of each model-parallel rank."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = []
    with tempfile.TemporaryDirectory(prefix="forge_ds_view_") as view_root:
        for t in range(n_ranks):
            view = _mp_rank_view(tag_dir, t, view_root, tag)
            noise = io.StringIO()  # zero_to_fp32 prints its progress
            try:
                with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
                    with weights_only_loads(tag_dir):
                        out.append(get_fp32_state_dict_from_zero_checkpoint(view, tag=tag))
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
                raise CheckpointError(f"DeepSpeed's zero_to_fp32 cannot read {tag_dir} (model-parallel rank {t}): "
                                      f"{' '.join(str(e).split())}") from None
    return out


def logical_masters(ds_dir: str, precision: str) -> Dict[str, torch.Tensor]:
    """Stage 0 in bf16/fp16 keeps its fp32 master weights in DeepSpeed's fp16/bf16 optimizer wrapper,
    which zero_to_fp32 does not read, and a pipeline's layer files hold TP shards without their
    layout: take them from forge-train's logical copy beside deepspeed/."""
    from forge_dist.io.statefile import load_state

    parent = os.path.dirname(os.path.abspath(ds_dir))
    try:
        logical = load_state(parent, LOGICAL_NAME)
    except CheckpointError:
        raise CheckpointError(f"{ds_dir} is ZeRO stage 0 in {precision}: its fp32 master weights are in "
                              f"{LOGICAL_NAME}.* of the forge-train checkpoint that holds it, which is missing "
                              f"in {parent}; consolidate that checkpoint directory") from None
    return {name: t["fp32"] for name, t in logical["params"].items()}


def resolve(path: str, tag: Optional[str] = None) -> Tuple[str, str, dict]:
    """(DeepSpeed save directory, tag directory, layout meta) of the checkpoint at ``path``."""
    found = locate(path)
    if found is None:
        raise CheckpointError(f"{path} is not a DeepSpeed checkpoint directory (no 'latest', {LAYOUT_NAME} or "
                              f"*_model_states.pt)")
    ds_dir, found_tag = found
    meta = read_layout(ds_dir)
    tag = tag or found_tag or meta["tag"]
    tag_dir = os.path.join(ds_dir, tag)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{ds_dir} has no checkpoint tag {tag!r}")
    return ds_dir, tag_dir, meta


def model_config(meta: dict, ds_dir: str):
    from forge_dist.config.loading import model_config_from_dict

    return model_config_from_dict(meta["model_config"], source=os.path.join(ds_dir, LAYOUT_NAME))


def consolidate(path: str, tag: Optional[str] = None) -> Tuple["OrderedDict[str, torch.Tensor]", object, dict]:
    """(logical fp32 state dict, ModelConfig, meta) of the DeepSpeed checkpoint at ``path``, whole
    in memory (zero_to_fp32); forge-convert streams instead (deepspeed_stream.py)."""
    from forge_dist.parallel.tensor.metadata import unshard

    ds_dir, tag_dir, meta = resolve(path, tag)
    tag = os.path.basename(tag_dir)
    layout = meta["layout"]
    n_ranks = layout["tp_size"] * layout["pp_size"]
    zero = layout["zero_stage"] > 0
    pipeline = layout.get("pp_size", 1) > 1  # the layer files hold every weight (fp32 masters: the logical copy)
    ranks = ([pipeline_states(tag_dir, layout["tp_size"])] if pipeline else _zero_states(tag_dir, tag, n_ranks) if zero
             else module_states(tag_dir, n_ranks))
    aliases = meta.get("aliases", {})  # tied names: joined once, under the first name
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for name, t in ranks[0].items():
        if name in aliases:
            continue
        info = shard_info(meta["shards"].get(name))
        missing = [i for i, r in enumerate(ranks) if name not in r]
        if missing:
            raise CheckpointError(f"{tag_dir}: model-parallel rank {missing[0]} has no {name}")
        state[name] = t if info is None or info.dim is None or pipeline else unshard([r[name] for r in ranks], info)
    if (pipeline or not zero) and (layout["precision"] != "fp32" or (pipeline and layout["tp_size"] > 1)):
        state.update(logical_masters(ds_dir, layout["precision"]))
    state.update({alias: state[first] for alias, first in aliases.items()})
    return state, model_config(meta, ds_dir), meta


def load_deepspeed(path: str, tag: Optional[str] = None):
    """(plain GPT with the consolidated fp32 weights, training info) for forge-convert."""
    from forge_dist.io.state import load_state
    from forge_dist.model.gpt import GPT

    state, cfg, meta = consolidate(path, tag)
    model = GPT(cfg)
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}  # buffers keep their dtype
    load_state(model, state, f"DeepSpeed checkpoint {path}")
    steps = re.fullmatch(r"global_step(\d+)", tag or meta["tag"])
    return model, {"iter_num": int(steps.group(1)) if steps else meta.get("global_steps")}

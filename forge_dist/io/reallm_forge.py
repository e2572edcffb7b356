"""ReaLLM-Forge ``ckpt.pt`` import and export.

A ckpt.pt is ``{"model": state_dict, "model_args": GPTConfig kwargs, "iter_num", "best_val_loss"
(tensor), "best_iter", "config": vars(args), "optimizer", "scheduler"}`` (reference 3.5).

Reading (torch.load(weights_only=True), or memory-mapped for --init_from prev_run) and writing
the file live here; the state-dict mapping between upstream's names and ours (``RULES``,
``register_rule``, ``Conversion``) lives in forge_dist/io/reallm_forge_rules.py and is re-exported.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from typing import Optional

import torch

from forge_dist.config.loading import model_args_from_config, model_config_from_model_args
from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.atomic import write_file_atomic
from forge_dist.io.state import load_state
from forge_dist.io.reallm_forge_rules import (  # noqa: F401  (re-exported: variant_rules, stream_export, tests)
    LAYOUTS, RULES, Conversion, DerivedBuffer, FusedQKNormScale, RenameModules, ScalarShape, StateDict,
    StateDictRule, StripPrefixes, causal_mask_buffer, from_upstream_state_dict, register_rule,
    to_upstream_state_dict, upstream_attention_is_manual,
)

CKPT_NAME = "ckpt.pt"
REQUIRED_KEYS = ("model", "model_args")
EXTRA_KEY = "forge_dist_tensors"  # ckpt.pt entry for Conversion.extra (upstream reads only "model")
TOKENIZER_KEY = "forge_dist_tokenizer"  # the tokenizer's spec() as JSON text, so the file samples on its own
DATA_DIR_KEY = "forge_dist_data_dir"  # the dataset folder the run trained on, so forge-eval finds it


# --- files ----------------------------------------------------------------------------------
def ckpt_path(path: str) -> str:
    """``path`` itself, or the ckpt.pt inside an upstream out_dir."""
    path = os.fspath(path)
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def read_ckpt(path: str, mmap: bool = False) -> dict:
    """torch.load(weights_only=True) of a ckpt.pt; a file that needs pickle is refused. ``mmap``:
    the tensors stay in the file, mapped (a page is read when touched; open_slices)."""
    path = ckpt_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist (expected a ReaLLM-Forge ckpt.pt or the out_dir holding it)")
    try:
        mmap = mmap and zipfile.is_zipfile(path)  # torch's legacy (pre-zip) format cannot be mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} needs pickle to load: it holds objects other than tensors and plain Python values "
            f"({first}). forge_dist refuses it because unpickling can run arbitrary code. If you trust "
            f"the file, re-save it with plain values: in a trusted session load it with pickle allowed "
            f"(torch.load with weights_only turned off), replace the offending objects (e.g. an "
            f"argparse.Namespace under 'config' by vars(namespace)), torch.save the dict and convert "
            f"that file") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a ReaLLM-Forge checkpoint: expected keys {list(REQUIRED_KEYS)}, "
                              f"found {keys}")
    return ckpt


def load_ckpt(path: str):
    """(GPT in train mode, training info) from a ReaLLM-Forge ckpt.pt (or its out_dir)."""
    from forge_dist.model.gpt import GPT

    ckpt = read_ckpt(path)
    model = GPT(_config(ckpt, path))
    training = _training(ckpt, path)
    conv = Conversion(model, iter_num=training.get("iter_num", 0), extra=_extra_tensors(ckpt, path))
    load_state(model, from_upstream_state_dict(dict(ckpt["model"]), conv), ckpt_path(path))
    return model, training


def open_mapped(path: str):
    """(model config, our state dict, training info) of a ckpt.pt, memory-mapped
    (torch.load(mmap=True, weights_only=True)): the import rules run on the mapped tensors against a
    meta-device GPT (renames and reshapes touch no data; a rule that computes reads only its own
    tensors), so a tensor's pages are read when it is used, and no GPT is built."""
    from forge_dist.model.gpt import GPT

    ckpt = read_ckpt(path, mmap=True)
    cfg = _config(ckpt, path)
    with torch.device("meta"):
        model = GPT(cfg)
    training = _training(ckpt, path)
    conv = Conversion(model, iter_num=training.get("iter_num", 0), extra=_extra_tensors(ckpt, path))
    return cfg, from_upstream_state_dict(dict(ckpt["model"]), conv), training


def open_slices(path: str):
    """(model config, SliceReader of our tensors) of a ckpt.pt for ``--init_from prev_run``
    (open_mapped): each rank copies its pieces; the pages of what it does not hold are not read."""
    from forge_dist.io.slice_read import StateDictSlices

    cfg, state, _ = open_mapped(path)
    return cfg, StateDictSlices(state, ckpt_path(path))


def _config(ckpt: dict, path: str) -> ModelConfig:
    try:
        return model_config_from_model_args(ckpt["model_args"])
    except ConfigError as e:
        raise ConfigError(f"{ckpt_path(path)}: {e}") from None


def _training(ckpt: dict, path: str) -> dict:
    """The training info a ckpt.pt carries (iteration, best loss, upstream's run config, ours)."""
    training = {k: ckpt[k] for k in ("iter_num", "best_iter") if isinstance(ckpt.get(k), int)}
    best = ckpt.get("best_val_loss")
    if isinstance(best, (torch.Tensor, int, float)) and not isinstance(best, bool):
        training["best_val_loss"] = float(best.item() if isinstance(best, torch.Tensor) else best)
    if isinstance(ckpt.get("config"), dict):
        training["reallm_forge_config"] = ckpt["config"]
    if isinstance(ckpt.get(TOKENIZER_KEY), str):
        try:
            training["tokenizer"] = json.loads(ckpt[TOKENIZER_KEY])
        except ValueError:
            raise CheckpointError(f"{ckpt_path(path)}: {TOKENIZER_KEY} is not valid JSON") from None
    if isinstance(ckpt.get(DATA_DIR_KEY), str):
        training["data_dir"] = ckpt[DATA_DIR_KEY]
    return training


def _extra_tensors(ckpt: dict, path: str) -> StateDict:
    extra = ckpt.get(EXTRA_KEY) or {}
    if not isinstance(extra, dict) or not all(isinstance(t, torch.Tensor) for t in extra.values()):
        raise CheckpointError(f"{ckpt_path(path)}: {EXTRA_KEY} must map names to tensors")
    return extra


def ckpt_file(path: str) -> str:
    """``path`` ending in .pt is the file; anything else is an out_dir that receives ckpt.pt."""
    return path if path.endswith(".pt") else os.path.join(path, CKPT_NAME)


def ckpt_object(cfg: ModelConfig, sd: StateDict, conv: Conversion, training: dict) -> dict:
    """What a ckpt.pt holds: upstream's keys around ``sd`` (upstream's names), our extra tensors,
    tokenizer and data folder (save_ckpt; io/stream_export.py writes the same object streamed)."""
    model_args = model_args_from_config(cfg)
    best = training.get("best_val_loss")
    config = dict(training.get("reallm_forge_config") or {})
    config.update({k: v for k, v in model_args.items() if k not in config})
    ckpt = {
        "model": sd,
        "model_args": model_args,
        "iter_num": int(training.get("iter_num", 0)),
        "best_iter": int(training.get("best_iter", training.get("iter_num", 0))),
        "best_val_loss": torch.tensor(1e9 if best is None else float(best)),
        "config": config,
        "optimizer": None,
        "scheduler": None,
    }
    if conv.extra:
        ckpt[EXTRA_KEY] = conv.extra
    if training.get("tokenizer"):
        ckpt[TOKENIZER_KEY] = json.dumps(training["tokenizer"])
    if training.get("data_dir"):
        ckpt[DATA_DIR_KEY] = str(training["data_dir"])
    return ckpt


def save_ckpt(model, path: str, training: Optional[dict] = None, layout: str = "snapshot") -> str:
    """Write a ckpt.pt upstream's train.py/sample.py load (strict key match with its GPT).

    ``path`` ending in .pt is the file; anything else is an out_dir that receives ckpt.pt.
    Returns the file written. Loads with torch.load(weights_only=True): tensors and plain values only.
    """
    training, path = training or {}, os.fspath(path)
    file = ckpt_file(path)
    conv = Conversion(model, layout, int(training.get("iter_num", 0)))
    sd = to_upstream_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, conv)
    ckpt = ckpt_object(model.config, sd, conv, training)
    write_file_atomic(file, lambda tmp: torch.save(ckpt, tmp))
    return file

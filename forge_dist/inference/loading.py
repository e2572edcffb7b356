"""A model and its tokenizer from whatever path the user gives forge-sample or forge-eval.

Accepted: a forge-train out_dir (its latest or best checkpoint), one training checkpoint directory,
a forge_dist model directory (model.safetensors + config.json), a ReaLLM-Forge ckpt.pt or the
out_dir holding it. The tokenizer (and the dataset forge-eval reads) comes from the training
checkpoint, from what a model directory or a ckpt.pt we wrote carries, from a ReaLLM-Forge
out_dir's meta.pkl, or from ``--dataset``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from forge_dist.errors import ConfigError
from forge_dist.io import checkpoint_read as ckpt


@dataclass
class Loaded:
    model: Any
    tokenizer: Any  # None when no tokenizer was found
    source: str  # the checkpoint actually read
    data_dir: Optional[str] = None  # the dataset the run trained on, when known


def _upstream_tokenizer(path: str):
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    meta = os.path.join(folder, "meta.pkl")
    if not os.path.isfile(meta):
        return None
    from forge_dist.data.meta_import import load_meta_pkl, tokenizer_from_upstream

    return tokenizer_from_upstream(load_meta_pkl(meta), folder)


def add_checkpoint_arguments(parser, dataset_help: str) -> None:
    """The options forge-sample and forge-eval share: which checkpoint, and which dataset."""
    parser.add_argument("--out_dir", default="out", help="forge-train out_dir, checkpoint directory or ckpt.pt")
    parser.add_argument("--ckpt", choices=("latest", "best"), default="latest", help="which checkpoint of an out_dir")
    parser.add_argument("--dataset", default=None, help=dataset_help)


def load_for_inference(path: str, which: str = "latest", dataset: Optional[str] = None,
                       device: str = "cpu") -> Loaded:
    from forge_dist.data.dataset import load_tokenizer
    from forge_dist.data.tokenizers import tokenizer_from_spec
    from forge_dist.io import from_pretrained, load_any

    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; give a forge-train out_dir, a checkpoint directory or a ckpt.pt")
    tokenizer, data_dir, source = None, None, path
    found = ckpt.find_training_checkpoint(path, which, retry=ckpt.INFERENCE_RETRY)
    if found is not None:
        ckpt.verify_checkpoint(found, retry=ckpt.INFERENCE_RETRY)
        state = ckpt.load_trainer_state(found)
        tokenizer = tokenizer_from_spec(state["tokenizer"]) if state.get("tokenizer") else None
        data_dir, source = state.get("data_dir"), found
        model = from_pretrained(os.path.join(found, ckpt.MODEL_DIR))
    else:
        model, training = load_any(path)  # a model/ folder or a ckpt.pt carries its tokenizer and dataset
        spec = training.get("tokenizer")
        data_dir = training.get("data_dir") if os.path.isdir(str(training.get("data_dir"))) else None
        tokenizer = (tokenizer_from_spec(spec) if spec else None) or _upstream_tokenizer(path)
    if dataset is not None:
        from forge_dist.data.dataset import resolve_dataset

        data_dir = str(resolve_dataset(dataset))
        tokenizer = load_tokenizer(data_dir)
    return Loaded(model.to(device).eval(), tokenizer, source, data_dir)


def require_tokenizer(loaded: Loaded) -> Any:
    if loaded.tokenizer is None:
        raise ConfigError(f"no tokenizer found for {loaded.source}; pass --dataset NAME_OR_PATH (the dataset "
                          f"the model was trained on; 'default' is the bundled corpus)")
    return loaded.tokenizer

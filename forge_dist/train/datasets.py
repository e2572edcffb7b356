"""Which datasets a run reads: --dataset, or the --dataset_list folders trained together.

A multi-dataset run (upstream's multidataset mode) needs every dataset to share one tokenizer (a
token id must mean the same in all of them), fills the model's ``lsv_dataset_num`` from the number
of datasets when learned steering vectors are on, and reads its batches through a
``MultiDatasetLoader`` (one dataset per iteration, drawn from (seed, iteration)).
"""
from __future__ import annotations

import os
from typing import Sequence

from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import ConfigError
from forge_dist.train.options import TrainConfig


def open_one(name: str, option: str):
    from forge_dist.data.dataset import read_meta, resolve_dataset

    data_dir = resolve_dataset(name)
    meta = read_meta(data_dir)
    if "val" not in meta.splits:
        raise ConfigError(f"{option} {data_dir} has no val split, which training evaluates on; prepare it "
                          f"with a validation fraction above 0 (see forge-prepare --help)")
    return str(data_dir), meta


def tokenizer_spec(data_dir: str, meta) -> dict:
    from forge_dist.data.tokenizers import tokenizer_from_spec

    return tokenizer_from_spec(meta.tokenizer, data_dir).spec()


def open_data(train_cfg: TrainConfig, explicit: dict):
    """(dataset folders, the meta of the first): --dataset, or every --dataset_list entry, which
    must share one tokenizer and vocabulary (token ids mean the same in all of them)."""
    if not train_cfg.dataset_list:
        data_dir, meta = open_one(train_cfg.dataset, "dataset")
        return [data_dir], meta
    if "dataset" in explicit:
        raise ConfigError(f"both --dataset {train_cfg.dataset} and --dataset_list are given; --dataset_list "
                          f"replaces --dataset, give one of them")
    opened = [open_one(name, "dataset_list entry") for name in train_cfg.dataset_list]
    (dir0, meta0), spec0 = opened[0], tokenizer_spec(*opened[0])
    for data_dir, meta in opened[1:]:
        if meta.vocab_size != meta0.vocab_size or tokenizer_spec(data_dir, meta) != spec0:
            raise ConfigError(f"the datasets of --dataset_list must share one tokenizer: {dir0} has a "
                              f"{spec0['kind']} tokenizer of {meta0.vocab_size} ids, {data_dir} a "
                              f"{meta.tokenizer.get('kind')} tokenizer of {meta.vocab_size} ids"
                              f"{' with other tokens' if meta.vocab_size == meta0.vocab_size else ''}; "
                              f"prepare them with the same tokenizer (e.g. forge-prepare --tokenizer byte, or "
                              f"--sp_model with one sentencepiece model)")
    return [d for d, _ in opened], meta0


def dataset_names(data_dirs: Sequence[str]) -> list:
    """Short unique names of the datasets (folder names; the position is added to duplicates), used
    in metric keys such as ``val_loss/<name>``."""
    base = [os.path.basename(os.path.normpath(d)) for d in data_dirs]
    return [b if base.count(b) == 1 else f"{i}_{b}" for i, b in enumerate(base)]


def fill_lsv_dataset_num(model_kwargs: dict, train_cfg: TrainConfig) -> None:
    """With --dataset_list and use_lsv, lsv_dataset_num is the number of datasets: filled in when
    unset (upstream sets it to len(dataset_list)), refused when set to another number."""
    datasets = train_cfg.dataset_list
    if not datasets or not model_kwargs.get("use_lsv"):
        return
    given = model_kwargs.get("lsv_dataset_num")
    if given is None:
        model_kwargs["lsv_dataset_num"] = len(datasets)
    elif given != len(datasets):
        raise ConfigError(f"lsv_dataset_num={given} but dataset_list has {len(datasets)} datasets "
                          f"({' '.join(datasets)}); the learned steering vectors need one entry per dataset: "
                          f"omit lsv_dataset_num (it is then {len(datasets)}) or list {given} datasets")


def open_loader(data_dirs: Sequence[str], model_cfg: ModelConfig, train_cfg: TrainConfig, dp_rank: int,
                 dp_size: int):
    """A BatchLoader for --dataset, a MultiDatasetLoader for --dataset_list."""
    from forge_dist.data.loader import BatchLoader, MultiDatasetLoader

    kwargs = dict(grad_accum_steps=train_cfg.gradient_accumulation_steps, dp_rank=dp_rank, dp_size=dp_size,
                  seed=train_cfg.seed)
    if train_cfg.dataset_list:
        return MultiDatasetLoader.from_dirs(data_dirs, model_cfg.block_size, train_cfg.batch_size,
                                            probs=train_cfg.dataset_sampling_probs, names=dataset_names(data_dirs),
                                            **kwargs)
    return BatchLoader.from_dir(data_dirs[0], model_cfg.block_size, train_cfg.batch_size, **kwargs)

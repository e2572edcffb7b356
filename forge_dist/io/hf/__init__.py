"""Hugging Face transformers model directories: export (``--to hf``) and import.

    save_hf(model, path, tokenizer=None)   config.json + safetensors + generation_config.json (+ the
                                           tokenizer's files), loadable by AutoModelForCausalLM
                                           with no custom code; refuses what has no exact equivalent
    load_hf(path)                          (GPT, {"tokenizer": spec}) from such a directory (safetensors
                                           only); the tokenizer travels on into our formats
    FAMILIES                               architecture name -> its mapping (gpt2.py, llama.py, mixtral.py,
                                           gemma2.py)

Neither direction imports transformers: the mapping is ours (mapping.py), the files are safetensors
and JSON. The mapping table is in docs/checkpoints.md.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.io.hf import files
from forge_dist.io.hf.files import MAX_SHARD_BYTES, is_hf_directory  # noqa: F401
from forge_dist.io.hf.gemma2 import Gemma2
from forge_dist.io.hf.gpt2 import GPT2
from forge_dist.io.hf.llama import Llama, Mistral
from forge_dist.io.hf.mapping import Family
from forge_dist.io.hf.mixtral import Mixtral
from forge_dist.io.state import load_state

FAMILIES: Dict[str, Family] = {f.architecture: f for f in (GPT2(), Llama(), Mistral(), Mixtral(), Gemma2())}
DERIVED_SUFFIXES = ("activation_x_offset", "activation_y_offset")  # buffers rebuilt from the config


def family_for(cfg: ModelConfig) -> Family:
    """The architecture an export targets, chosen by the options that decide it; ``check`` then
    refuses, by name, anything else it cannot express."""
    if cfg.use_moe:
        return FAMILIES["MixtralForCausalLM"]
    if cfg.norm_variant_attn == "layernorm" or (cfg.use_abs_pos_embeddings and not cfg.use_rotary_embeddings):
        return FAMILIES["GPT2LMHeadModel"]
    if cfg.use_peri_ln or cfg.use_embedding_scale or cfg.attn_logit_softcapping or cfg.final_logit_softcapping:
        return FAMILIES["Gemma2ForCausalLM"]
    if cfg.window_size is not None:
        return FAMILIES["MistralForCausalLM"]
    return FAMILIES["LlamaForCausalLM"]


def hf_state_dict(model, family: Family) -> Dict[str, torch.Tensor]:
    cfg = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_exportable(family, cfg, state, state.__getitem__)
    return {t.theirs: t.build(state) for t in family.tensors(cfg)}


def check_exportable(family: Family, cfg: ModelConfig, names, get) -> None:
    """Refuse an export that would lose something: a tensor the architecture fixes (``implied``,
    read with ``get(name)``) at another value, or one of our ``names`` the mapping does not place."""
    for name, value in family.implied(cfg).items():
        ours = get(name)
        if not torch.equal(ours, value.to(ours.dtype)):
            raise ConfigError(f"{name} is not {value.flatten()[:4].tolist()}...: {family.architecture} has no "
                              f"slot for it, so this model has no exact {family.architecture} equivalent")
    used = set(family.implied(cfg))
    for t in family.tensors(cfg):
        used.update(t.ours)
    if cfg.wte_weight_tying:
        used.add("lm_head.weight")
    left = [k for k in names if k not in used and not k.endswith(DERIVED_SUFFIXES)]
    if left:  # a mapping that forgot a tensor must fail loudly, never drop weights
        raise CheckpointError(f"the {family.architecture} mapping does not place {left[:4]}; this is a bug")


def save_hf(model, path: str, tokenizer=None, max_shard_bytes: int = MAX_SHARD_BYTES,
            dtype: Optional[torch.dtype] = None) -> str:
    """Write ``model`` (a single-device GPT) as a transformers directory at ``path``, atomically."""
    cfg = model.config
    family = family_for(cfg)
    family.check(cfg)  # refuse before any tensor is touched
    tensors = hf_state_dict(model, family)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    config, generation, tok_files = directory_files(family, cfg, next(iter(tensors.values())).dtype, tokenizer)
    files.write_directory(os.fspath(path), config, generation, tensors, tok_files, max_shard_bytes)
    return os.fspath(path)


def directory_files(family: Family, cfg: ModelConfig, dtype: torch.dtype, tokenizer=None):
    """(config.json, generation_config.json, the tokenizer's files) of an export."""
    from forge_dist.io.hf.tokenizer import tokenizer_files

    tok_files, special = tokenizer_files(tokenizer) if tokenizer is not None else ({}, {})
    config = {"architectures": [family.architecture], "model_type": family.model_type,
              "dtype": str(dtype).replace("torch.", ""), "bos_token_id": special.get("bos_token_id"),
              "eos_token_id": special.get("eos_token_id"), "pad_token_id": None, **family.to_hf_config(cfg)}
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "do_sample": False}
    return config, generation, tok_files


def read_hf_config(path: str):
    """(family, ModelConfig) of a transformers directory, every field checked by name."""
    hf = files.read_config(path)
    archs = hf.get("architectures") or []
    by_type = [a for a, f in FAMILIES.items() if f.model_type == hf.get("model_type")]
    name = archs[0] if len(archs) == 1 else (by_type[0] if not archs and by_type else None)
    if name not in FAMILIES:
        raise ConfigError(f"{path}: architecture {archs or hf.get('model_type')!r} is not supported; forge_dist "
                          f"imports {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    if hf.get("model_type") != family.model_type:
        raise ConfigError(f"{path}: model_type {hf.get('model_type')!r} does not match {name} "
                          f"(expected {family.model_type!r})")
    try:
        return family, ModelConfig(**family.from_hf_config(hf))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except KeyError as e:  # we never guess a size the file leaves to transformers' defaults
        raise ConfigError(f"{path}: config.json of {name} lacks the field {e.args[0]!r}; forge_dist needs it "
                          f"stated (re-save the config with transformers)") from None


def placement(family: Family, cfg: ModelConfig, stored, path: str) -> Dict[str, tuple]:
    """{our name: (its transformers Tensor, index in that tensor's from_hf output)}, every name of
    ``stored`` (the directory's tensors) checked: a missing one or one without a place is refused."""
    where, used = {}, set()
    for t in family.tensors(cfg):
        if not t.ours:
            continue  # a slot our model lacks (zeros on export)
        if t.theirs not in stored:
            raise CheckpointError(f"{path}: tensor {t.theirs} is missing")
        used.add(t.theirs)
        where.update({name: (t, k) for k, name in enumerate(t.ours)})
    if cfg.wte_weight_tying:
        used.add("lm_head.weight")  # some writers store the tied head too
    zero_slots = {t.theirs for t in family.tensors(cfg) if not t.ours}
    unexpected = sorted(set(stored) - used - zero_slots)
    if unexpected:
        raise CheckpointError(f"{path}: tensors {unexpected[:4]} have no place in forge_dist's {family.architecture} "
                              f"mapping (another variant of the architecture?)")
    return where


def load_hf(path: str):
    """(GPT in train mode, training info) from a transformers directory (safetensors only); the
    info holds the directory's tokenizer (``tokenizer`` spec), when it has one."""
    from forge_dist.io.hf.tokenizer import read_tokenizer
    from forge_dist.model.gpt import GPT

    path = os.fspath(path)
    family, cfg = read_hf_config(path)
    theirs = files.read_tensors(path)
    where = placement(family, cfg, theirs, path)
    model = GPT(cfg)
    own = model.state_dict()
    state = {k: v for k, v in own.items() if k.endswith(DERIVED_SUFFIXES)}
    state.update(family.implied(cfg))
    for t in {id(t): t for t, _ in where.values()}.values():
        state.update(zip(t.ours, t.from_hf(theirs[t.theirs])))
    if cfg.wte_weight_tying:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    load_state(model, state, path)
    tokenizer = read_tokenizer(path)
    return model, ({"tokenizer": tokenizer.spec()} if tokenizer is not None else {})

"""forge-convert from any checkpoint to any format, one tensor at a time.

A DeepSpeed checkpoint (io/deepspeed_stream.py ``DeepSpeedReader``), a sharded training checkpoint
(io/sharded_read.py ``ShardedWeights``), a forge_dist model directory (io/weights_reader.py), a
ReaLLM-Forge ckpt.pt (memory-mapped) or a transformers directory (io/hf/slices.py ``HfSlices``:
each of our tensors made from the block of theirs its mapping's transform names, read alone) is a
``TensorSource``: the model config, the training info, and ``tensor(name)``, one logical tensor
read when asked for. The writers plan the output on a meta-device GPT (names, dtypes, shapes,
which storages are shared) and fill it tensor by tensor, in the bytes the whole-model path writes:

    save_hf_streamed      --to hf: each transformers tensor built from its few tensors of ours
                          (mapping.py ``build``), each shard written header first
    save_ckpt_streamed    --to reallm-forge: the export rules (reallm_forge.RULES) run once on the
                          meta state dict to plan the file, then on one transformer block (or one
                          tensor outside the blocks) at a time for the values; torch.save's own
                          writer asks for each storage record in turn (io/torch_zip_stream.py)

The peak is one output tensor and the tensors of ours it is made of (for ckpt.pt, one transformer
block's, its derived buffers such as upstream's causal mask included).
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, List, Optional

import torch

from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.io.reallm_forge import Conversion


class NotStreamable(CheckpointError):
    """The export cannot be planned on the meta device (a rule computes from values): forge-convert
    takes the whole-model path instead."""


class TensorSource:
    """Our logical tensors of a checkpoint, one at a time; ``names``: the plain GPT's state-dict
    names (tied ones included, read under their first name)."""

    def __init__(self, config, training: dict, get: Callable[[str], torch.Tensor], description: str,
                 close: Callable[[], None] = lambda: None):
        from forge_dist.io.slice_read import tied_aliases
        from forge_dist.model.gpt import GPT

        self.config, self.training, self._get, self.description = config, training, get, description
        self.close = close  # releases the source's open files (``with source:``)
        with torch.device("meta"):
            self.meta = GPT(config)
        own = self.meta.state_dict(keep_vars=True)
        self.names, self._first, self._dtypes = list(own), tied_aliases(own), {n: t.dtype for n, t in own.items()}
        self.reads: List[str] = []  # every tensor read, in order (tests: nothing is read twice)

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tensor(self, name: str) -> torch.Tensor:
        """A fresh tensor in the plain GPT's dtype (load_state's copy would convert the same way)."""
        stored = self._first.get(name, name)
        self.reads.append(stored)
        value = self._get(stored)
        return value if value.dtype == self._dtypes[name] else value.to(self._dtypes[name])


def open_source(src: str) -> TensorSource:
    """The TensorSource of a forge-convert ``src``: a DeepSpeed checkpoint, a sharded one, a model
    directory, a ReaLLM-Forge ckpt.pt (memory-mapped) or a transformers directory."""
    from forge_dist.io.convert_source import find_source
    from forge_dist.io.forge_format import WEIGHTS_NAME, is_forge_checkpoint, read_config
    from forge_dist.io.pretrained import checkpoint_kind

    path, is_deepspeed, extra = find_source(os.fspath(src))
    if is_deepspeed:
        source = deepspeed_source(path)
    elif is_forge_checkpoint(path):
        cfg, training = read_config(path)
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            from forge_dist.io.weights_reader import WeightsReader

            weights = WeightsReader(path)
            source = TensorSource(cfg, dict(training), weights.get, path, weights.close)
        else:
            from forge_dist.io.sharded_read import ShardedWeights

            source = TensorSource(cfg, dict(training), ShardedWeights(path).get, path)
    elif checkpoint_kind(path) == "hf":
        source = _hf_source(path)
    else:
        source = _mapped_ckpt(path)
    for key, value in extra.items():  # as convert.load_source
        if not source.training.get(key):
            source.training[key] = value
    return source


def deepspeed_source(path: str, tag: Optional[str] = None) -> TensorSource:
    """A DeepSpeed checkpoint of any ZeRO stage (io/deepspeed_stream.py ``DeepSpeedReader``; ``tag``:
    another one than ``latest`` names), refused by name when it lacks a tensor of its model."""
    from forge_dist.io.deepspeed_stream import DeepSpeedReader, iter_num

    reader = DeepSpeedReader(path, tag)
    source = TensorSource(reader.config, {"iter_num": iter_num(reader, tag)}, reader.tensor,
                          f"DeepSpeed checkpoint {path}")
    unknown = sorted(set(source.names) - set(reader.names) - set(reader.aliases) - set(source._first))
    if unknown:
        raise CheckpointError(f"{source.description} does not fit the model built from its config: "
                              f"missing {', '.join(unknown[:8])}")
    return source


def _mapped_ckpt(path: str) -> TensorSource:
    """A ckpt.pt, memory-mapped and mapped to our names (reallm_forge.open_mapped), checked by the
    whole path's strict load checks (io/state.py ``check_state``)."""
    from forge_dist.io.reallm_forge import ckpt_path, open_mapped
    from forge_dist.io.slice_read import tied_aliases
    from forge_dist.io.state import check_state

    cfg, state, training = open_mapped(path)
    source = TensorSource(cfg, training, lambda n: state[n].clone(), ckpt_path(path))
    own = source.meta.state_dict(keep_vars=True)
    check_state(own, state, source.description, [[f, a] for a, f in tied_aliases(own).items()])
    return source


def _hf_source(path: str) -> TensorSource:
    """A transformers directory: each of our tensors read whole through its mapping's slicer
    (io/hf/slices.py), the buffers the mapping leaves to the config (DERIVED_SUFFIXES) at their
    constructor values, the directory's tokenizer along (as load_hf)."""
    from forge_dist.io.hf import DERIVED_SUFFIXES
    from forge_dist.io.hf.slices import HfSlices
    from forge_dist.io.hf.tokenizer import read_tokenizer
    from forge_dist.model.gpt import GPT

    reader = HfSlices(path)
    tokenizer = read_tokenizer(path)
    derived: Dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name.endswith(DERIVED_SUFFIXES):
            if not derived:  # the small constructor-valued tensors only: the drawn weights stay on meta
                derived.update((n, t) for n, t in GPT(reader.config, defer_init=True).state_dict().items()
                               if n.endswith(DERIVED_SUFFIXES))
            return derived[name].clone()
        return reader.full(name, source._dtypes[name])

    source = TensorSource(reader.config, {"tokenizer": tokenizer.spec()} if tokenizer is not None else {}, get,
                          path, reader.close)
    return source


def save_forge_streamed(source: TensorSource, dst: str) -> str:
    """``save_pretrained`` of the source's model, tensor by tensor (the same files)."""
    from forge_dist.atomic import atomic_directory
    from forge_dist.io.deepspeed_stream import write_safetensors
    from forge_dist.io.forge_format import ALIASES_KEY, WEIGHTS_NAME, is_forge_checkpoint, save_config

    own, aliases = source.meta.state_dict(keep_vars=True), source._first
    entries = {n: (t.dtype, tuple(t.shape)) for n, t in own.items() if n not in aliases}
    with atomic_directory(os.fspath(dst), may_replace=is_forge_checkpoint) as tmp:
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), entries, source.tensor,
                          {"format": "pt", ALIASES_KEY: json.dumps(aliases, sort_keys=True)})
        save_config(source.meta.config, tmp, source.training)
    return os.fspath(dst)


def save_hf_streamed(source: TensorSource, dst: str, tokenizer=None, max_shard_bytes: Optional[int] = None) -> str:
    """``save_hf`` of the source's model, tensor by tensor (same files)."""
    from forge_dist.io.hf import check_exportable, directory_files, family_for, files

    cfg = source.config
    family = family_for(cfg)
    family.check(cfg)
    check_exportable(family, cfg, source.names, source.tensor)
    meta_state = {k: v.detach() for k, v in source.meta.state_dict().items()}
    tensors = {t.theirs: t for t in family.tensors(cfg)}
    with torch.device("meta"):
        planned = {name: t.build(meta_state) for name, t in tensors.items()}
    entries = {name: (p.dtype, tuple(p.shape)) for name, p in planned.items()}
    config, generation, tok_files = directory_files(family, cfg, next(iter(planned.values())).dtype, tokenizer)

    def value(name: str) -> torch.Tensor:
        t = tensors[name]
        return t.build({n: source.tensor(n) for n in t.ours})

    files.write_directory_streamed(os.fspath(dst), config, generation, entries, value, tok_files,
                                   max_shard_bytes or files.MAX_SHARD_BYTES)
    return os.fspath(dst)


class _PartConversion(Conversion):
    """A Conversion of part of the state dict: rules that walk the model's modules or its layers
    see only those whose tensors are in the part."""

    def __init__(self, *args, names=(), **kw):
        super().__init__(*args, **kw)
        self.names = names
        self._layers = sorted({int(m.group(1)) for m in map(re.compile(r"transformer\.h\.(\d+)\.").match, names) if m})

    def layers(self):
        return self._layers

    def modules(self, cls):
        for prefix, module in super().modules(cls):
            if any(n.startswith(prefix) for n in self.names):
                yield prefix, module


def _group(name: str) -> str:
    """The unit the export rules map together: a transformer block, or one tensor outside them."""
    m = re.match(r"(transformer\.h\.\d+\.)", name)
    return m.group(1) if m else name


def save_ckpt_streamed(source: TensorSource, dst: str, layout: str = "snapshot") -> str:
    """``save_ckpt`` of the source's model, tensor by tensor (same file, io/torch_zip_stream.py)."""
    from forge_dist.atomic import write_file_atomic
    from forge_dist.io import reallm_forge as rf
    from forge_dist.io.torch_zip_stream import plannable, save_streamed

    training, model = source.training, source.meta
    iter_num = int(training.get("iter_num", 0))
    meta_sd = {k: v.detach() for k, v in model.state_dict().items()}

    def export(sd: Dict[str, torch.Tensor], whole: bool = False):
        conv = Conversion(model, layout, iter_num) if whole else _PartConversion(model, layout, iter_num, names=set(sd))
        out = rf.to_upstream_state_dict(sd, conv)
        return {**out, **{("extra", k): v for k, v in conv.extra.items()}}, conv

    try:
        with torch.device("meta"):  # the plan: names, shapes, shared storages; what each block makes
            plan, conv = export(dict(meta_sd), whole=True)
            free = set(export({})[0])  # made from the config alone (none among the built-in rules)
            owner = {}
            for g in dict.fromkeys(_group(n) for n in meta_sd):
                for out in export({n: t for n, t in meta_sd.items() if _group(n) == g})[0]:
                    if out not in free:
                        owner.setdefault(out, g)
    except (ConfigError, CheckpointError):  # a refusal (``layout``, a rule's own check): the user's to fix
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:  # a rule that needs values
        raise NotStreamable(f"an export rule does not run on the meta device ({type(e).__name__}: {e})") from None
    unknown = [k for k in plan if k not in owner and k not in free]
    odd = [k for k, t in plan.items() if not t.is_meta or not plannable(t)]
    if unknown or odd:
        raise NotStreamable(f"{(unknown or odd)[:4]} cannot be planned tensor by tensor")
    ckpt = rf.ckpt_object(model.config, {k: v for k, v in plan.items() if not isinstance(k, tuple)}, conv, training)
    best = ckpt["best_val_loss"]
    ckpt["best_val_loss"] = torch.empty((), dtype=best.dtype, device="meta")
    by_id = {id(t): k for k, t in plan.items()}
    providers, seen = set(), set()  # the first tensor of each storage, in the order torch writes them
    for k, t in [*ckpt["model"].items(), *((("extra", n), v) for n, v in conv.extra.items())]:
        if t.untyped_storage()._cdata not in seen:
            seen.add(t.untyped_storage()._cdata)
            providers.add(k)
    ready: Dict[object, torch.Tensor] = {}

    def fill(planned: torch.Tensor) -> torch.Tensor:
        if planned is ckpt["best_val_loss"]:
            return best
        key = by_id[id(planned)]
        if key not in ready:
            g = owner.get(key)
            if g is None:  # derived from the config: all of them in one run of the rules, kept until written
                ready.update({k: v for k, v in export({})[0].items() if k in providers})
            else:  # one block's (or one outer tensor's) outputs, kept until torch writes them
                made = export({n: source.tensor(n) for n in source.names if _group(n) == g})[0]
                ready.update({k: v for k, v in made.items() if owner.get(k) == g and k in providers})
        return ready.pop(key)

    file = rf.ckpt_file(os.fspath(dst))
    write_file_atomic(file, lambda tmp: save_streamed(ckpt, tmp, fill))
    return file

"""ReaLLM-Forge ``ckpt.pt`` import and export.

A ckpt.pt is ``{"model": state_dict, "model_args": GPTConfig kwargs, "iter_num", "best_val_loss"
(tensor), "best_iter", "config": vars(args), "optimizer", "scheduler"}`` (reference 3.5). Module
names are the same on both sides by design; the differences live in ``RULES`` below, the one
place that maps state dicts between the two:

  StripPrefixes   ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes, import only
  RenameModules   module spellings that changed upstream (peri-LN ``out_ln_*`` at the snapshot,
                  ``peri_ln_*`` later): both accepted on import, the layout's spelling on export
  ScalarShape     one-element parameters whose shape changed upstream (``embedding_scale``: 0-d at
                  the snapshot, (1,) later)
  DerivedBuffer   tensors upstream keeps in its state dict and forge_dist derives instead (the
                  causal-mask ``attn.bias``): dropped on import, rebuilt on export
  FusedQKNormScale  the learned qk-norm scale g of the layers where upstream's causal attention
                  takes its SDPA path (effective scale g·d^(-1/4) there, g here): rescaled both
                  ways, so an imported checkpoint computes upstream's function

Export targets a ``layout``: "snapshot" (the reference snapshot 42dfe7f, default) or "latest"
(upstream master as stored in the public index, which renamed the items above).

A variant family whose state differs from upstream's adds its rule with ``register_rule``
(forge_dist/io/variant_rules.py: quantized linears' buffers, bitlinear_optimized's signs,
stored activations, the latest layout's LSV names); each rule maps whole state dicts so it may
rename, drop, synthesise, split or stack tensors. Rules see a ``Conversion``: the forge_dist model
on our side (its modules tell a rule which names belong to which variant), the layout, the
iteration, and ``extra``, tensors we keep that upstream's state dict has no slot for; they travel
in the ckpt.pt under ``forge_dist_tensors``, which upstream ignores.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.config.loading import model_args_from_config, model_config_from_model_args
from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.atomic import write_file_atomic
from forge_dist.io.state import load_state

CKPT_NAME = "ckpt.pt"
REQUIRED_KEYS = ("model", "model_args")
EXTRA_KEY = "forge_dist_tensors"  # ckpt.pt entry for Conversion.extra (upstream reads only "model")
TOKENIZER_KEY = "forge_dist_tokenizer"  # the tokenizer's spec() as JSON text, so the file samples on its own
DATA_DIR_KEY = "forge_dist_data_dir"  # the dataset folder the run trained on, so forge-eval finds it

LAYOUTS = ("snapshot", "latest")  # ReaLLM-Forge versions an export can target (module docstring)

StateDict = Dict[str, torch.Tensor]


@dataclass
class Conversion:
    """What a rule may read besides the state dict it maps."""

    model: nn.Module  # the forge_dist GPT being loaded into (import) or exported from (export)
    layout: str = "snapshot"  # the upstream version an export targets (import accepts all)
    iter_num: int = 0  # the checkpoint's training iteration
    extra: StateDict = field(default_factory=dict)  # our tensors upstream has no slot for

    @property
    def cfg(self) -> ModelConfig:
        return self.model.config

    def modules(self, cls) -> Iterator[Tuple[str, nn.Module]]:
        """(state-dict prefix, module) of every ``cls`` module, a shared one under every name it
        has (as state_dict lists it)."""
        for name, module in self.model.named_modules(remove_duplicate=False):
            if isinstance(module, cls):
                yield (name + "." if name else ""), module


class StateDictRule:
    """Maps a whole state dict in each direction; the default is the identity."""

    def from_upstream(self, sd: StateDict, conv: Conversion) -> StateDict:
        return sd

    def to_upstream(self, sd: StateDict, conv: Conversion) -> StateDict:
        return sd


class StripPrefixes(StateDictRule):
    def __init__(self, *prefixes: str):
        self.prefixes = prefixes

    def from_upstream(self, sd, conv):
        out = {}
        for name, t in sd.items():
            for p in self.prefixes:
                while name.startswith(p):
                    name = name[len(p):]
            out[name] = t
        return out


class RenameModules(StateDictRule):
    """Dotted name components: ``accepted`` upstream spellings -> ours on import;
    ``exported[layout]`` ours -> upstream on export."""

    def __init__(self, accepted: Dict[str, str], exported: Optional[Dict[str, Dict[str, str]]] = None):
        self.accepted, self.exported = accepted, exported or {}

    @staticmethod
    def _rename(sd, table):
        if not table:
            return sd
        return {".".join(table.get(part, part) for part in name.split(".")): t for name, t in sd.items()}

    def from_upstream(self, sd, conv):
        return self._rename(sd, self.accepted)

    def to_upstream(self, sd, conv):
        return self._rename(sd, self.exported.get(conv.layout, {}))


class ScalarShape(StateDictRule):
    """A one-element tensor ``name`` whose shape differs between layouts; ours is (1,)."""

    def __init__(self, name: str, shapes: Dict[str, tuple]):
        self.name, self.shapes = name, shapes

    def from_upstream(self, sd, conv):
        t = sd.get(self.name)
        if t is not None and t.numel() == 1:
            sd = {**sd, self.name: t.reshape(1)}
        return sd

    def to_upstream(self, sd, conv):
        if self.name in sd:
            sd = {**sd, self.name: sd[self.name].reshape(self.shapes[conv.layout])}
        return sd


class DerivedBuffer(StateDictRule):
    """A per-layer tensor upstream stores and we derive: ``transformer.h.{i}.<suffix>``.

    ``build(layer_cfg, cfg)`` returns the tensor upstream holds for that layer, or None where
    upstream has none.
    """

    def __init__(self, suffix: str, build: Callable[[ModelConfig, ModelConfig], Optional[torch.Tensor]]):
        self.suffix, self.build = suffix, build
        self.pattern = re.compile(r"transformer\.h\.\d+\." + re.escape(suffix) + "$")

    def from_upstream(self, sd, conv):
        return {n: t for n, t in sd.items() if not self.pattern.match(n)}

    def to_upstream(self, sd, conv):
        out, cfg = dict(sd), conv.cfg
        from forge_dist.model.sharing import module_config

        for i in range(cfg.n_layer):
            kind = self.suffix.split(".")[0]  # "attn" or "mlp": the module the buffer belongs to
            t = self.build(module_config(cfg, i, kind), cfg)  # the config that module was built from
            if t is not None:
                out[f"transformer.h.{i}.{self.suffix}"] = t
        return out


def upstream_attention_is_manual(layer_cfg: ModelConfig) -> bool:
    """Whether upstream's CausalSelfAttention takes its manual (non-SDPA) path, which registers
    the persistent causal-mask buffer ``bias``: any softmax variant, a window, GQA, FIRE, soft-capping,
    attention activation quantization or disable_flash_attention (reference 2.5)."""
    c = layer_cfg
    quant = [c.quantize_attn_act, c.quantize_attn_act_bits]
    for name in c.field_names():
        if name.startswith("quantize_attn_act_"):
            group = c.quantize_attn_act_bits if name.endswith("_bits") else c.quantize_attn_act
            quant.append(getattr(c, name) or group)  # upstream's set_variant fallback
        elif name.startswith("quantize_linear_attn_") and name.endswith("_bits"):
            quant.append(getattr(c, name) or c.quantize_linear_bits)
    quantized = any(v is True or (type(v) is int and v == 1) for v in quant)  # upstream tests `== True`
    return (c.softmax_variant_attn != "softmax" or c.window_size is not None or c.kv_groups != c.n_head
            or c.use_fire_embeddings or bool(c.attn_logit_softcapping) or quantized
            or c.disable_flash_attention)


def causal_mask_buffer(layer_cfg: ModelConfig, cfg: ModelConfig) -> Optional[torch.Tensor]:
    """``attn.bias``: tril(ones(block, block)) viewed (1, 1, block, block), where upstream has it."""
    variant = layer_cfg.attention_variant
    if variant == "infinite" or (variant == "causal" and upstream_attention_is_manual(layer_cfg)):
        L = cfg.block_size
        return torch.tril(torch.ones(L, L)).view(1, 1, L, L)
    return None


class FusedQKNormScale(StateDictRule):
    """``attn.qk_norm_factor`` where upstream's CausalSelfAttention takes its SDPA path.

    Upstream's fused path pre-multiplies q by g·d^(1/4) and SDPA scales by d^(-1/2): the scores are
    q·k·g·d^(-1/4); its manual path and its ``infinite`` variant use q·k·g (reference 2.5). We use
    q·k·g in every path (docs/divergences.md), so import stores g·d^(-1/4) for those layers and
    export stores g·d^(1/4): the logits match both ways, d being the layer's query head dim.
    Export also keeps our g among the extra tensors; import takes it back while upstream's value
    is still the one exported (a checkpoint trained on upstream afterwards is rescaled instead).
    """

    pattern = re.compile(r"transformer\.h\.(\d+)\.attn\.qk_norm_factor$")

    @staticmethod
    def upstream_factor(layer_cfg: ModelConfig) -> Optional[float]:
        """upstream's effective scale / g for this layer, or None where it is g itself."""
        c = layer_cfg
        if c.attention_variant == "causal" and c.use_qk_norm_scale and not upstream_attention_is_manual(c):
            return c.head_dim ** -0.25
        return None

    def _layers(self, sd, conv):
        """(name, factor) of every rescaled tensor in ``sd``."""
        from forge_dist.model.sharing import module_config

        for name in sd:
            m = self.pattern.match(name)
            factor = self.upstream_factor(module_config(conv.cfg, int(m.group(1)), "attn")) if m else None
            if factor is not None:
                yield name, factor

    @staticmethod
    def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
        return (t.double() * factor).to(t.dtype)

    def from_upstream(self, sd, conv):
        out = dict(sd)
        for name, factor in self._layers(sd, conv):
            ours = conv.extra.get(name)  # our exact value, kept by export: a round trip is bit-exact
            exact = ours is not None and torch.equal(self._scaled(ours, 1 / factor), sd[name])
            out[name] = ours if exact else self._scaled(sd[name], factor)
        return out

    def to_upstream(self, sd, conv):
        out = dict(sd)
        for name, factor in self._layers(sd, conv):
            out[name] = self._scaled(sd[name], 1 / factor)
            conv.extra[name] = sd[name]
        return out


RULES: List[StateDictRule] = [
    StripPrefixes("_orig_mod.", "module."),
    RenameModules(accepted={"peri_ln_attn": "out_ln_attn", "peri_ln_mlp": "out_ln_mlp"},
                  exported={"latest": {"out_ln_attn": "peri_ln_attn", "out_ln_mlp": "peri_ln_mlp"}}),
    ScalarShape("embedding_scale", {"snapshot": (), "latest": (1,)}),
    DerivedBuffer("attn.bias", causal_mask_buffer),
    FusedQKNormScale(),
]


def register_rule(rule: StateDictRule) -> StateDictRule:
    """Add a variant family's mapping. Rules run in list order both ways, so a registered rule
    sees names without prefixes and in our spelling on import, and every built-in rule applied
    on export."""
    RULES.append(rule)
    return rule


def from_upstream_state_dict(sd: StateDict, conv: Conversion) -> StateDict:
    for rule in RULES:
        sd = rule.from_upstream(sd, conv)
    return sd


def to_upstream_state_dict(sd: StateDict, conv: Conversion) -> StateDict:
    """Our state dict in upstream's names; tensors upstream cannot hold go to ``conv.extra``."""
    if conv.layout not in LAYOUTS:
        raise ConfigError(f"layout={conv.layout!r} is not a ReaLLM-Forge layout; valid values: {', '.join(LAYOUTS)}")
    for rule in RULES:
        sd = rule.to_upstream(sd, conv)
    return sd


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

"""The one mechanism every transformers architecture family uses (gpt2.py, llama.py, mixtral.py).

A ``Family`` says three things about one transformers architecture:

  which of our configurations it expresses EXACTLY   ``check(cfg)``: every ModelConfig field must
                                                     be at its default, inert (``INERT``), fixed
                                                     to the family's value (``fixed``) or mapped
                                                     (``mapped``); the first other one is refused
                                                     by name, with the family-specific checks after
  how the configs correspond                         ``to_hf_config`` / ``from_hf_config``
  how the tensors correspond                         ``tensors(cfg)``: a list of ``Tensor``, one per
                                                     transformers tensor, built from one or more
                                                     of ours by a ``to_hf`` function and split back
                                                     by ``from_hf``

Transforms are exact (permutations, transposes, concatenations), so forge -> hf -> forge gives
the same bits. The checks run before any tensor is read or written.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import ConfigError

_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(ModelConfig)}

# Fields that never change a forward pass in eval, or are knobs of a variant whose selector
# (attention_variant, softmax_variant_attn, norm_variant_*, activation_variant, mlp_variant,
# linear_variant_*, quantize_*, use_fire_embeddings, use_lsv, use_moe, ...) the check itself holds at
# its default or at the family's value.
_INERT_PREFIXES = (
    "init_", "gaussian_", "embedding_mean_init", "embedding_std_init", "linear_mean_init", "linear_std_init",
    "embedding_scale_init", "n_embd_wte_scale_tying", "use_gradient_checkpointing", "disable_flash_attention",
    "dropout", "moe_", "n_experts", "sym_rot_num_angles", "fire_", "shared_fire_embeddings", "mla_", "use_mla_lobo",
    "ssm_", "n_latent", "triadic_loops", "mod_fn", "n_qk_head_dim", "n_v_head_dim", "n_cproj", "use_concat_heads",
    "prmsnorm_", "krmsnorm_", "hsnorm_", "dact_", "kan_", "shifted_gelu_", "pla_", "pfla_", "lsa_",
    "consmax_", "softermax_", "polymax_", "sigsoftmax_", "strongermax_", "exppolymax_", "softplus_",
    "relumax_", "relu2max_", "sigmoidmax_", "squareplus_", "div_by_seq_len",
    "flash_lobo_log_const", "use_flash_lobo_per_head", "use_flash_obo_const",
    "start_quant_level", "quant_scheduler", "full_quant_iteration", "quantization_warmup_iters",
    "activations_quant_method", "quantize_linear_method", "quantize_linear_bits", "quantize_wte_method",
    "quantize_wte_bits", "quantize_wpe_method", "quantize_wpe_bits", "quantize_attn_act_bits",
    "quantize_mlp_act_bits", "store_activations", "apply_vector_scaling_factor", "obtain_vector_",
    "lsv_", "apply_lsv_at_layer_idx",
)
_INERT_SUFFIXES = ("_bits", "_method")  # per-point quantization knobs; their enabling flags are checked


def is_inert(name: str) -> bool:
    if name.startswith("quantize_") and name.endswith(_INERT_SUFFIXES):
        return True
    return name.startswith(_INERT_PREFIXES)


def non_default_fields(cfg: ModelConfig) -> List[Tuple[str, object]]:
    """(name, value) of every field that differs from ModelConfig's default, in field order."""
    return [(n, getattr(cfg, n)) for n in ModelConfig.field_names() if getattr(cfg, n) != _DEFAULTS[n]]


# --- tensor transforms (each exact and invertible) -------------------------------------------------
def half_rotation_order(head_dim: int) -> torch.Tensor:
    """RoPE layout change. We rotate interleaved pairs (2i, 2i+1) (forge_dist.model.position);
    transformers' rotate_half pairs (i, i + D/2) with the same frequency theta_i. Row j of a
    transformers q/k head is our row ORDER[j]: 0, 2, 4, ..., 1, 3, 5, ... Applying the same
    permutation to q and k leaves every q.k product unchanged."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _slices(from_hf: Callable, slicer: Callable) -> Callable:
    """``from_hf`` that also tells how to read only a block of its output (io/hf/slices.py):
    ``slicer(k, index)`` -> (index into theirs, function turning that block into our block of
    output ``k``), or None where the block needs the whole tensor."""
    from_hf.slicer = slicer
    return from_hf


def elementwise(from_hf: Callable) -> Callable:
    """A from_hf acting element by element (identity, Gemma 2's gain offset): same index."""
    return _slices(from_hf, lambda k, index: (index, lambda block: from_hf(block)[k]))


def rope_rows(head_dim: int):
    """(to_hf, from_hf) permuting the per-head output rows of a q/k weight (H*D, C) or bias (H*D,)."""
    order = half_rotation_order(head_dim)
    inverse = torch.argsort(order)

    def permute(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        heads = t.reshape(-1, head_dim, *t.shape[1:])  # (H, D, ...)
        return heads[:, idx].reshape(t.shape).contiguous()

    def slicer(k, index):  # whole heads (a tensor-parallel shard): the same rows, permuted inside each
        rows = index[0]
        if rows.start % head_dim or rows.stop % head_dim:
            return None
        return index, lambda block: permute(block, inverse)

    return (lambda ts: permute(ts[0], order)), _slices(lambda t: [permute(t, inverse)], slicer)


def transposed():
    """GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)."""
    return (lambda ts: ts[0].t().contiguous()), _slices(
        lambda t: [t.t().contiguous()], lambda k, index: (index[::-1], lambda block: block.t().contiguous()))


def concatenated(sizes: Sequence[int], dim: int, transpose: bool = False):
    """Several of ours side by side along ``dim`` (optionally each transposed first)."""
    def to_hf(ts):
        return torch.cat([t.t() if transpose else t for t in ts], dim=dim).contiguous()

    def from_hf(t):
        return [p.t().contiguous() if transpose else p.contiguous() for p in torch.split(t, list(sizes), dim=dim)]

    def slicer(k, index):  # part k is sizes[k] wide at offset sum(sizes[:k]) along dim
        index = list(index[::-1] if transpose else index)
        base = sum(sizes[:k])
        index[dim] = slice(base + index[dim].start, base + index[dim].stop)
        return tuple(index), (lambda block: block.t().contiguous()) if transpose else (lambda block: block)

    return to_hf, _slices(from_hf, slicer)


def identity():
    return (lambda ts: ts[0]), elementwise(lambda t: [t])


@dataclass
class Tensor:
    """One transformers tensor ``theirs`` made from our tensors ``ours`` (empty: zeros of
    ``shape``, for a slot the architecture always has and our model lacks, e.g. GPT-2 biases)."""

    theirs: str
    ours: Tuple[str, ...]
    to_hf: Callable = field(default_factory=lambda: identity()[0])
    from_hf: Callable = field(default_factory=lambda: identity()[1])
    shape: Optional[Tuple[int, ...]] = None  # for ours == ()

    def build(self, state: Dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.ours:
            return torch.zeros(self.shape)
        return self.to_hf([state[n] for n in self.ours])


def entry(theirs: str, ours: str, transform=None, **kw) -> Tensor:
    to_hf, from_hf = transform if transform is not None else identity()
    return Tensor(theirs, (ours,), to_hf, from_hf, **kw)


def optional(theirs: str, ours: str, present: bool, shape: Tuple[int, ...], transform=None) -> Tensor:
    """A slot transformers always has and our config may leave out (zeros then; exact)."""
    return entry(theirs, ours, transform) if present else Tensor(theirs, (), shape=shape)


class Family(abc.ABC):
    """One transformers architecture; subclasses fill the tables and the three mappings."""

    architecture: str = ""  # e.g. "LlamaForCausalLM"
    model_type: str = ""  # config.json "model_type"
    fixed: Dict[str, object] = {}  # our fields the architecture pins, with the value it needs
    mapped: Tuple[str, ...] = ()  # our fields with a transformers counterpart (any value)

    def check(self, cfg: ModelConfig) -> None:
        """Raise ConfigError naming the first option this architecture cannot express exactly."""
        for name, value in self.fixed.items():
            if getattr(cfg, name) != value:
                raise ConfigError(self.refusal(name, getattr(cfg, name), f"{name}={value!r}"))
        for name, value in non_default_fields(cfg):
            if name in self.fixed or name in self.mapped or is_inert(name):
                continue
            raise ConfigError(self.refusal(name, value, f"its default {_DEFAULTS[name]!r}"))
        self.check_more(cfg)

    def refusal(self, name: str, value, needed: str) -> str:
        return (f"{name}={value!r} has no exact equivalent in transformers' {self.architecture} "
                f"(it needs {needed}); export to --to forge or --to reallm-forge instead")

    def check_more(self, cfg: ModelConfig) -> None:
        """Cross-field conditions (activation names, head sizes, ...)."""

    @abc.abstractmethod
    def to_hf_config(self, cfg: ModelConfig) -> dict:
        """The architecture's config.json fields (without architectures/model_type)."""

    @abc.abstractmethod
    def from_hf_config(self, hf: dict) -> dict:
        """ModelConfig keyword arguments for a transformers config.json (checked: refuses unknown
        fields and values by name)."""

    @abc.abstractmethod
    def tensors(self, cfg: ModelConfig) -> List[Tensor]:
        """Every tensor of the architecture's state dict, in its order."""

    def implied(self, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
        """Our tensors the architecture has no slot for because it fixes their value (a router
        without bias: zeros). Import sets them; export refuses a model whose values differ."""
        return {}


def check_hf_fields(hf: dict, family: Family, accepted: Dict[str, Callable[[object], bool]]) -> None:
    """Refuse every config.json field that is neither metadata (HF_INERT) nor in ``accepted``
    with an acceptable value."""
    for key, value in hf.items():
        if key in HF_INERT:
            continue
        if key not in accepted:
            raise ConfigError(f"config.json field {key}={value!r} of {family.architecture} is not supported by "
                              f"forge_dist's import (nothing in our model corresponds to it)")
        if not accepted[key](value):
            raise ConfigError(f"config.json field {key}={value!r} of {family.architecture} has no exact "
                              f"equivalent in forge_dist's model")


# config.json fields that describe the file, generation defaults, or training-only settings
HF_INERT = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "use_cache", "attention_dropout", "attn_pdrop", "embd_pdrop",
    "resid_pdrop", "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "add_cross_attention", "n_ctx", "_name_or_path", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "tokenizer_class",
    "task_specific_params", "torchscript",
})


def equals(*values):
    return lambda v: v in values


def is_bool(v) -> bool:
    return isinstance(v, bool)


def is_positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# Elementwise activations whose transformers ACT2FN entry is the same function as ours
# (ours: torch.nn modules, forge_dist.model.activation; theirs: transformers.activations).
ACTIVATIONS = {"gelu": "gelu", "silu": "silu", "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}

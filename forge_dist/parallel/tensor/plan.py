"""Sharding plans: what a rule returns, and the styles that carry it out.

A rule (rules/) looks at one module of the plain model and returns a ``Plan``, a declaration:

    Plan(children={"c_attn_q": Column(), "c_proj": Row()},       # submodules it takes over
         params={"qk_norm_factor": Replicate(partial=True)},      # its own parameters
         enter=True,                # a TP region: enter once (copy / all-gather) on the input
         rng="sharded",             # dropout inside sees sharded activations
         residual_dropout=("resid_dropout",),   # dropout on the module's output (residual stream)
         inner_sharded=True)        # submodules it does not take over see sharded activations

Two more fields for data flows beyond column -> row: ``exit_at`` names the submodule at whose input
the module leaves its TP region (deferred row outputs summed there, or a replicated full sequence
split into sequence shards), and ``inner_sequence_parallel=False`` plans the submodules without
sequence parallelism (an MoE layer gathers the whole sequence once for its router and experts).

Plans are made for the whole model before anything changes, so a module with parameters and no
rule (or a rule that forgets a parameter) is refused before the model is touched; then the
styles apply them. Styles build the parallel layers from the full modules (slicing), and every
parameter ends with a ShardInfo.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Tuple

import torch.nn as nn

from forge_dist.errors import ConfigError
from forge_dist.parallel.groups import ProcessGroups, RankGroup
from forge_dist.parallel.tensor import mappings
from forge_dist.parallel.tensor.layers import (OUTPUT_MODES, ColumnParallelLinear, RowParallelLinear,
                                               sharded_parameter)
from forge_dist.parallel.tensor.metadata import ShardInfo, set_shard_info
from forge_dist.parallel.tensor.random import RNGTracker
from forge_dist.parallel.tensor.sequence import enter_region, replace_input


class NoShardingRuleError(ConfigError):
    """A module (or parameter) of the model has no tensor-parallel rule; the message names it."""


@dataclass(frozen=True)
class ShardContext:
    """What a rule may look at besides the module: the groups, the effective sequence parallelism
    (only with tp > 1), the vocabulary padding, the RNG tracker (None when the model has no
    randomness), the module's path, and whether the module sees sharded activations (a partial
    view of the data: head/feature shards, or sequence shards) so that its replicated parameters
    get partial gradients."""

    groups: ProcessGroups
    sequence_parallel: bool = False
    vocab_divisible_by: int = 128
    tracker: Optional[RNGTracker] = None
    path: str = ""
    sharded_data: bool = False

    @property
    def tp(self) -> RankGroup:
        return self.groups.tp

    def at(self, path: str, sharded_data: bool, sequence_parallel: Optional[bool] = None) -> "ShardContext":
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        return replace(self, path=path, sharded_data=sharded_data, sequence_parallel=sp)

    def name(self, child: str) -> str:
        return f"{self.path}.{child}" if self.path else child


# --- linear classes the Column/Row styles can split ----------------------------------------------
@dataclass(frozen=True)
class LinearTP:
    """How one linear class is split: factories ``column(module, group, input_mode=, num_shards=,
    segments=)`` and ``row(module, group, input_is_parallel=, sequence_parallel=, output_mode=)``,
    and the row output modes it supports."""

    column: Callable
    row: Callable
    row_modes: Tuple[str, ...] = OUTPUT_MODES
    check: Optional[Callable[[nn.Module, "ShardContext"], None]] = None  # refuse what cannot be split exactly


# class -> LinearTP; the quantized linear variants and KAN register theirs in rules/linear.py
LINEAR_TP: Dict[type, LinearTP] = {
    nn.Linear: LinearTP(ColumnParallelLinear.from_linear, RowParallelLinear.from_linear),
}


def linear_tp(module: nn.Module, ctx: "ShardContext") -> LinearTP:
    if type(module) not in LINEAR_TP:
        raise NoShardingRuleError(
            f"{ctx.path} is a {type(module).__qualname__}, which has no tensor-parallel linear; register "
            f"its column/row versions in forge_dist.parallel.tensor.plan.LINEAR_TP "
            f"(see forge_dist/parallel/tensor/rules/linear.py)")
    entry = LINEAR_TP[type(module)]
    if entry.check is not None:
        entry.check(module, ctx)
    return entry


def row_supports(module: nn.Module, output_mode: str) -> bool:
    """Whether ``module``'s row-parallel version can give ``output_mode`` (e.g. "deferred")."""
    return type(module) in LINEAR_TP and output_mode in LINEAR_TP[type(module)].row_modes


# --- styles ---------------------------------------------------------------------------------------
class ModuleStyle(abc.ABC):
    """How one submodule is sharded."""

    def check(self, module: nn.Module, ctx: "ShardContext") -> None:
        """Raise NoShardingRuleError if this style cannot take ``module`` (changes nothing); ``ctx``
        is the submodule's (ctx.path its path)."""

    @abc.abstractmethod
    def apply(self, module: nn.Module, ctx: ShardContext, owner: nn.Module, entered: bool) -> nn.Module:
        """Return the module to put in place of ``module`` (it may be ``module``, annotated)."""


class ParamStyle(abc.ABC):
    """How one parameter of the planned module itself is sharded."""

    @abc.abstractmethod
    def apply_param(self, owner: nn.Module, name: str, ctx: ShardContext) -> None:
        """Annotate (or replace) ``owner.<name>``."""


@dataclass(frozen=True)
class Column(ModuleStyle):
    """Column-parallel linear; ``num_shards`` distinct shards (default: one per TP rank),
    ``segments`` blocks split separately (2 for [a | b] gated layouts), ``input``: the input
    mapping (layers.enter_column) when it is not the region's own (entered once: "none";
    otherwise "copy", or "sequence" under sequence parallelism)."""

    num_shards: Optional[int] = None
    segments: int = 1
    input: Optional[str] = None

    def check(self, module, ctx):
        linear_tp(module, ctx)

    def apply(self, module, ctx, owner, entered):
        mode = self.input or ("none" if entered else ("sequence" if ctx.sequence_parallel else "copy"))
        return linear_tp(module, ctx).column(module, ctx.tp, input_mode=mode, num_shards=self.num_shards,
                                             segments=self.segments)


@dataclass(frozen=True)
class Row(ModuleStyle):
    """Row-parallel linear whose input is a column layer's output (input_is_parallel); ``output``:
    layers.reduce_row's mode ("exit", "sharded" or "deferred")."""

    output: str = "exit"

    def check(self, module, ctx):
        if self.output not in linear_tp(module, ctx).row_modes:
            raise NoShardingRuleError(f"{ctx.path} is a {type(module).__qualname__}, whose row-parallel version "
                                      f"cannot give output mode {self.output!r}")

    def apply(self, module, ctx, owner, entered):
        return linear_tp(module, ctx).row(module, ctx.tp, input_is_parallel=True,
                                          sequence_parallel=ctx.sequence_parallel, output_mode=self.output)


@dataclass(frozen=True)
class Replicate(ModuleStyle, ParamStyle):
    """Every parameter of the submodule (or the one parameter) stays whole on every TP rank;
    ``partial``: its gradient on a rank is a partial sum (it is used on sharded data)."""

    partial: bool = False

    def apply(self, module, ctx, owner, entered):
        for p in module.parameters():
            set_shard_info(p, ShardInfo.replicated(p, self.partial and ctx.tp.size > 1))
        return module

    def apply_param(self, owner: nn.Module, name: str, ctx: ShardContext) -> None:
        p = getattr(owner, name)
        set_shard_info(p, ShardInfo.replicated(p, self.partial and ctx.tp.size > 1))


@dataclass(frozen=True)
class ReplicateAfterSum(ModuleStyle):
    """A layer kept whole whose input is a partial sum over the TP group (infinite attention's heads
    summed per rank): the input is all-reduced first (its gradient passes unchanged), so the layer
    computes the full output on every rank and its parameters' gradients are whole. Any linear
    variant, KAN included, works this way."""

    def apply(self, module, ctx, owner, entered):
        for p in module.parameters():
            set_shard_info(p, ShardInfo.replicated(p))
        if ctx.tp.size > 1:
            replace_input(module, lambda x: mappings.reduce_from_tp_region(x, ctx.tp))
        return module


@dataclass(frozen=True)
class ShardChannels(ModuleStyle):
    """A depthwise convolution (groups == channels) split by channel: weight (C, 1, K) and bias
    (C,) along dim 0, with its channel counts set to the local ones."""

    def check(self, module, ctx):
        if (not isinstance(module, nn.Conv1d) or module.groups != module.in_channels
                or module.out_channels != module.in_channels):
            raise NoShardingRuleError(f"{ctx.path} is not a depthwise Conv1d (groups == channels); ShardChannels "
                                      f"cannot split it")

    def apply(self, module, ctx, owner, entered):
        for name in ("weight", "bias"):
            p = getattr(module, name)
            if p is not None:
                setattr(module, name, sharded_parameter(p, ShardInfo(tuple(p.shape), 0, ctx.tp.size), ctx.tp))
        module.in_channels = module.out_channels = module.groups = module.weight.shape[0]
        return module


@dataclass(frozen=True)
class Shard(ParamStyle):
    """A parameter split along ``dim`` with the heads (or features) it belongs to."""

    dim: int = 0
    num_shards: Optional[int] = None

    def apply_param(self, owner: nn.Module, name: str, ctx: ShardContext) -> None:
        p = getattr(owner, name)
        n = ctx.tp.size if self.num_shards is None else self.num_shards
        if p.shape[self.dim] % n:
            raise ConfigError(f"{ctx.name(name)} of shape {tuple(p.shape)} cannot be split into {n} "
                              f"shards along dim {self.dim}")
        info = ShardInfo(tuple(p.shape), self.dim, n, partial_grad=n < ctx.tp.size)
        setattr(owner, name, sharded_parameter(p, info, ctx.tp))


# --- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    children: Dict[str, ModuleStyle] = field(default_factory=dict)
    params: Dict[str, ParamStyle] = field(default_factory=dict)
    enter: bool = False
    rng: Optional[str] = None
    residual_dropout: Tuple[str, ...] = ()
    inner_sharded: Optional[bool] = None
    exit_at: Optional[str] = None
    exit_partial: bool = True  # exit_at receives partial sums (reduced) or a replicated sequence (split)
    inner_sequence_parallel: Optional[bool] = None
    finalize: Optional[Callable[[nn.Module, ShardContext], None]] = None

    def check(self, module: nn.Module, ctx: ShardContext, rule_name: str) -> None:
        for name, p in module.named_parameters(recurse=False):
            if name not in self.params:
                raise NoShardingRuleError(
                    f"the tensor-parallel rule {rule_name} of {type(module).__qualname__} ({ctx.path or 'model'}) "
                    f"does not say how to shard its parameter {name!r} {tuple(p.shape)}")
        for path, style in self.children.items():
            style.check(module.get_submodule(path), ctx.at(ctx.name(path), ctx.sharded_data))
        for path in self.residual_dropout + ((self.exit_at,) if self.exit_at else ()):
            module.get_submodule(path)

    def apply(self, module: nn.Module, ctx: ShardContext) -> None:
        for path, style in self.children.items():
            parent_path, _, attr = path.rpartition(".")
            parent = module.get_submodule(parent_path) if parent_path else module
            child = getattr(parent, attr)
            new = style.apply(child, ctx.at(ctx.name(path), ctx.sharded_data), module, self.enter)
            if new is not child:
                setattr(parent, attr, new)
        for name, style in self.params.items():
            if isinstance(getattr(module, name, None), nn.Parameter):
                style.apply_param(module, name, ctx)
        if self.enter and ctx.tp.size > 1:
            enter_region(module, ctx.tp, ctx.sequence_parallel)
        if self.exit_at and ctx.tp.size > 1 and (self.exit_partial or ctx.sequence_parallel):
            group, sp = ctx.tp, ctx.sequence_parallel
            leave = ((lambda x: mappings.exit_tp_region(x, group, sp)) if self.exit_partial
                     else (lambda x: mappings.scatter_to_sequence_region(x, group)))
            replace_input(module.get_submodule(self.exit_at), leave)
        if ctx.tracker is not None:
            if self.rng is not None:
                ctx.tracker.attach(module, self.rng)
            kind = "sharded" if ctx.sequence_parallel else ("replicated" if self.rng else None)
            for path in self.residual_dropout if kind else ():
                ctx.tracker.attach(module.get_submodule(path), kind)
        if self.finalize is not None:
            self.finalize(module, ctx)

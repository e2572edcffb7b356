"""Rule of the GPT itself: vocab-parallel token table (quantized or not) and LM head (tied or
not), replicated position table, factorised-embedding adapters and embedding scale, and the
sequence-parallel split of the residual stream (scattered at the embedding dropout, gathered
after ln_f). A quantized token table (quantize_wte) fake-quantizes its rows with the statistics
of the whole unpadded table, reduced over the ranks (parallel/tensor/quantized.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from forge_dist.model.gpt import GPT, LMHead
from forge_dist.model.quantize import QuantizedEmbedding
from forge_dist.parallel.tensor import sequence
from forge_dist.parallel.tensor.plan import ModuleStyle, NoShardingRuleError, Plan, Replicate, ShardContext
from forge_dist.parallel.tensor.quantized import QuantizedVocabParallelEmbedding
from forge_dist.parallel.tensor.rules.registry import TP_RULES
from forge_dist.parallel.tensor.vocab import VocabParallelEmbedding, VocabParallelLMHead


def _exactly(module: nn.Module, classes, path: str) -> None:
    if type(module) not in classes:  # a subclass computes differently: needs its own style
        raise NoShardingRuleError(f"{path} is a {type(module).__qualname__}, which has no tensor-parallel "
                                  f"style (the vocab-parallel ones take {', '.join(c.__qualname__ for c in classes)}); "
                                  f"add one in {__name__}")


@dataclass(frozen=True)
class VocabEmbedding(ModuleStyle):
    def check(self, module, ctx):
        _exactly(module, (nn.Embedding, QuantizedEmbedding), ctx.path)

    def apply(self, module, ctx, owner, entered):
        if isinstance(module, QuantizedEmbedding):
            return QuantizedVocabParallelEmbedding(module, ctx.tp, ctx.vocab_divisible_by, owner.config)
        return VocabParallelEmbedding.from_embedding(module, ctx.tp, ctx.vocab_divisible_by)


@dataclass(frozen=True)
class VocabHead(ModuleStyle):
    """LMHead -> VocabParallelLMHead; ``tied_to`` names the (already sharded) embedding whose
    Parameter the head shares."""

    tied_to: Optional[str] = None

    def check(self, module, ctx):
        _exactly(module, (LMHead,), ctx.path)

    def apply(self, module, ctx, owner, entered):
        tied = self.tied_to is not None
        weight = owner.get_submodule(self.tied_to).weight if tied else module.weight
        return VocabParallelLMHead(weight, ctx.tp, module.weight.shape[0], module.softcap,
                                   ctx.vocab_divisible_by, tied=tied)


def _sequence_split(model: GPT, ctx: ShardContext) -> None:
    if ctx.sequence_parallel:
        # the embedding output (replicated: wte is all-reduced, wpe added) is split before dropout;
        # ln_f runs on shards and its output is gathered for the (replicated-input) LM head
        sequence.scatter_input(model.transformer.drop, ctx.tp)
        sequence.gather_output(model.transformer.ln_f, ctx.tp, grad_is_partial=False)


@TP_RULES.register(GPT)
def gpt(model: GPT, ctx: ShardContext) -> Plan:
    t = model.transformer
    children = {"transformer.wte": VocabEmbedding()}
    if "wpe" in t:
        children["transformer.wpe"] = Replicate()
    for name in ("scale_up", "scale_down"):  # factorised embeddings: small, run on replicated data
        if name in t:
            children[f"transformer.{name}"] = Replicate()
    tied = model.lm_head.weight is t.wte.weight
    children["lm_head"] = VocabHead(tied_to="transformer.wte" if tied else None)
    return Plan(children=children, params={"embedding_scale": Replicate()},
                residual_dropout=("transformer.drop",), inner_sharded=ctx.sequence_parallel,
                finalize=_sequence_split)

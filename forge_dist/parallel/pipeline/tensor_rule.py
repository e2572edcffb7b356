"""The tensor-parallel rule of a pipeline stage (GPTChunk): the GPT's own rule restricted to what
the stage holds. The first stage shards the token table (and scatters the sequence under sequence
parallelism, at the embedding dropout); the last shards the head (tied to the table only when the
same chunk holds both: a separate copy is sharded alike, and the pipeline sums its gradient with
the table's) and gathers the sequence after ln_f. Middle stages receive and send sequence shards,
as Megatron does with sequence parallelism and pipelining."""
from __future__ import annotations

from forge_dist.parallel.pipeline.stage import GPTChunk
from forge_dist.parallel.tensor import sequence
from forge_dist.parallel.tensor.plan import Plan, Replicate, ShardContext
from forge_dist.parallel.tensor.rules.model import VocabEmbedding, VocabHead
from forge_dist.parallel.tensor.rules.registry import TP_RULES


def _sequence_split(chunk: GPTChunk, ctx: ShardContext) -> None:
    if not ctx.sequence_parallel:
        return
    if chunk.is_first:
        sequence.scatter_input(chunk.transformer.drop, ctx.tp)
    if chunk.is_last:
        sequence.gather_output(chunk.transformer.ln_f, ctx.tp, grad_is_partial=False)


@TP_RULES.register(GPTChunk)
def gpt_chunk(chunk: GPTChunk, ctx: ShardContext) -> Plan:
    t = chunk.transformer
    children = {"transformer.wte": VocabEmbedding()} if "wte" in t else {}
    for name in ("wpe", "scale_up", "scale_down"):
        if name in t:
            children[f"transformer.{name}"] = Replicate()
    if chunk.lm_head is not None:
        tied = "wte" in t and chunk.lm_head.weight is t.wte.weight
        children["lm_head"] = VocabHead(tied_to="transformer.wte" if tied else None)
    return Plan(children=children, params={"embedding_scale": Replicate()},
                residual_dropout=("transformer.drop",) if "drop" in t else (),
                inner_sharded=ctx.sequence_parallel, finalize=_sequence_split)

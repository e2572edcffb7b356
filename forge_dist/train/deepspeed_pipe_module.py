"""DeepSpeed's ``PipelineModule`` built from forge_dist's stages (train/deepspeed_pipeline.py runs it).

    pipe, pieces = pipeline_module(model, plan, groups, parallel_config)

n_layer + 2 layers, each a GPTChunk (parallel/pipeline/stage.py) under the GPT's own names: the
embeddings (TiedLayerSpec "wte"), one per block, the final norm and head (HeadChunk, TiedLayerSpec
"wte"); our split's stage bounds replace DeepSpeed's partition methods; under TP the pieces are
sharded by our rules; from a GPT on the meta device only this stage's pieces get values (drawn,
or read from a checkpoint: ``_shard_and_fill``); ``_mark_norm_params`` says which copies
DeepSpeed's gradient norm counts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist.parallel.pipeline.stage import GPTChunk
from forge_dist.parallel.pipeline.tensor_rule import gpt_chunk
from forge_dist.parallel.tensor.rules.registry import TP_RULES

TIED_KEY = "wte"


# --- the PipelineModule ----------------------------------------------------------------------------
class HeadChunk(GPTChunk):
    """The last layer: final norm, head and loss. DeepSpeed hands labels to ``loss_fn`` only, so
    forward passes the activations through and ``loss`` runs the GPTChunk's last-stage forward."""

    def __init__(self, model, lsv: bool):
        n = model.config.n_layer
        super().__init__(model, n, n, is_first=False, is_last=True, lsv=lsv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(x, labels)[0]


TP_RULES.register(HeadChunk)(gpt_chunk)  # a GPTChunk's TP rule: vocab-parallel head, sequence gather


def layer_specs(model, plan):
    """(DeepSpeed layer specs, partition bounds) of ``model`` split as ``plan`` says."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg = model.config
    n = cfg.n_layer
    lsv_point = cfg.apply_lsv_at_layer_idx if cfg.use_lsv else None
    owner = lsv_point if lsv_point is not None and 0 < lsv_point <= n else 0  # the layer applying LSV
    owner = owner if cfg.use_lsv else -1
    first_attrs, head_attrs = [], []
    if cfg.wte_weight_tying:
        first_attrs.append("transformer.wte.weight")
        head_attrs.append("lm_head.weight")
    if cfg.n_embd_wte is not None and cfg.n_embd_wte_scale_tying:
        first_attrs.append("transformer.scale_up.weight")
        head_attrs.append("transformer.scale_down.weight")
    first_args = (GPTChunk, model, 0, 0, True, False, owner == 0)
    specs = [TiedLayerSpec(TIED_KEY, *first_args, tied_weight_attr=first_attrs) if first_attrs
             else LayerSpec(*first_args)]
    specs += [LayerSpec(GPTChunk, model, i, i + 1, False, False, owner == i + 1) for i in range(n)]
    specs.append(TiedLayerSpec(TIED_KEY, HeadChunk, model, False, tied_weight_attr=head_attrs) if head_attrs
                 else LayerSpec(HeadChunk, model, False))
    bounds = [0] + [b + 1 for _, b in plan.layers[:-1]] + [n + 2]
    return specs, bounds


class _Pieces(nn.Module):
    """This rank's pieces in one module, so ``parallelize`` shards them (and what two of them
    share) once; it holds no parameters of its own."""

    def __init__(self, config, pieces):
        super().__init__()
        self.config = config
        self.pieces = nn.ModuleDict({str(i): c for i, c in enumerate(pieces)})


def pipeline_module(model, plan, groups, parallel_config, weights=None):
    """The PipelineModule of this rank's stage (collective: DeepSpeed builds its grid and tied
    groups over the world), checked against our ProcessGroups' coordinates; under TP its pieces
    are sharded by forge_dist's rules (parallelize) and their partial gradients summed over TP.
    ``model`` may be on the meta device (train/model_build.py builds it so): DeepSpeed builds only
    this stage's layers from it, and only their parameters get values, drawn from the streams a
    one-process build draws, or their pieces read by ``weights`` (SliceReader, fresh_ok) from a
    gathered resume or --init_from prev_run, before DeepSpeed moves them or broadcasts the tied ones."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology

    canonical = canonical_names(model)

    class ForgePipelineModule(PipelineModule):
        """DeepSpeed's module with forge_dist's stage split (explicit bounds, not a method), whose
        layers are sharded and materialised as soon as DeepSpeed has built them."""

        def _partition_layers(self, method="uniform"):
            self.parts = list(bounds)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def _build(self):
            super()._build()
            _shard_and_fill(model, [f for f in self.forward_funcs if isinstance(f, GPTChunk)], canonical, groups,
                            parallel_config, weights)

    specs, bounds = layer_specs(model, plan)
    t = groups.topology  # Megatron's rank order, DeepSpeed's too: TP innermost, then DP, PP outermost
    topo = (PipeModelDataParallelTopology(num_pp=t.pp, num_mp=t.tp, num_dp=t.dp) if t.tp > 1
            else PipeDataParallelTopology(num_pp=t.pp, num_dp=t.dp))
    pipe = ForgePipelineModule(specs, topology=topo, partition_method="forge")
    grid = pipe._grid
    where = (grid.get_stage_id(), grid.get_data_parallel_rank(), grid.get_slice_parallel_rank())
    if where != (groups.coord.pp, groups.coord.dp, groups.tp.rank):
        raise RuntimeError(f"DeepSpeed's grid puts rank {groups.global_rank} at (stage, data, model) {where}; "
                           f"forge_dist's topology at {groups.coord}")
    local = [f for f in pipe.forward_funcs if isinstance(f, GPTChunk)]
    if t.tp > 1:
        from forge_dist.train.deepspeed_tp import register_tp_grad_hooks, set_model_parallel_attributes

        set_model_parallel_attributes(pipe, groups)
        register_tp_grad_hooks(pipe, groups)  # partial gradients summed over TP as they are produced
    head = next((f for f in local if isinstance(f, HeadChunk)), None)
    if head is not None:
        pipe.loss_fn = head.loss
    _mark_norm_params(pipe, groups.tp.rank)
    pipe.config = model.config
    return pipe, local


def canonical_names(model) -> dict:
    """A GPT parameter name -> the first name of its tensor (a tied head draws the table's stream)."""
    first: dict = {}
    for name, p in model.named_parameters():
        first.setdefault(id(p), name)
    return {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def _shard_and_fill(model, local, canonical, groups, parallel_config, weights) -> None:
    """This stage's pieces sharded over TP (shapes only, if on meta), then their meta parameters
    given values (parallel/pipeline/materialize.py): no other stage's layer is ever materialised."""
    from forge_dist.parallel.pipeline.materialize import materialize_chunks

    if groups.tp.size > 1:
        from forge_dist.parallel.parallelize import parallelize

        parallelize(_Pieces(model.config, local), groups, parallel_config)
    if not any(p.is_meta for c in local for p in c.parameters()):
        return  # a full model was handed over
    load = None
    if weights is not None:
        from forge_dist.io.slice_read import load_slices

        def load(chunk):
            load_slices(chunk, weights[0], groups, partial=True, fresh_ok=weights[1])
    materialize_chunks(model, local, canonical, groups, load)


def _mark_norm_params(pipe, tp_rank: int) -> None:
    """Which copies count in DeepSpeed's gradient norm. Its tied-module indexing marks every
    parameter of the non-first tied piece replicated (the head's norm too): only the tied weights
    are. Its fp32 stage-0 clipping counts a parameter off model-parallel rank 0 only when marked
    ``model_parallel``: every stage's own parameters are (each held by one stage), on TP rank 0
    or, split over TP, on every rank holding a distinct shard (``tensor_model_parallel``)."""
    tied = {id(w) for w, _ in pipe.get_tied_weights_and_groups()}
    first = all(pipe.global_rank == min(c["ranks"]) for c in pipe.tied_comms.values())
    for p in pipe.parameters():
        p.ds_pipe_replicated = id(p) in tied and not first
        split = bool(getattr(p, "tensor_model_parallel", False))
        p.tensor_model_parallel = split and not p.ds_pipe_replicated
        p.model_parallel = not p.ds_pipe_replicated and (split or tp_rank == 0)

"""Cross-layer sharing: the plan against a simulation of upstream's construction loop, one module
object per tie (one set of parameters, gradients summed over every use), state dicts under every
layer prefix, per-layer overrides that must agree, and the MoE slot with its auxiliary loss."""
import itertools

import pytest
import torch

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ConfigError, ModelConfig
from forge_dist.model.cache import KVCache
from forge_dist.model.gpt import GPT
from forge_dist.model.moe import MoELayer, collect_moe_aux_loss
from forge_dist.model.sharing import SharingPlan, physical_layers, sharing_plan


def tiny(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)


def tokens(seed=1):
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def unique_params(module):
    return {id(p): p for p in module.parameters()}


# --- the plan -------------------------------------------------------------------------------
def upstream_construction(n_layer, size, seq, sym):
    """Upstream's loop, simulated with fresh objects: over ceil(n/2) layers (sym) or all; with a
    pool of `seq` slots indexed (i // size) % seq, else a new object whenever i % size == 0; then
    mirror (odd: without the centre). Returns the objects' first-use numbering."""
    pool, group, current = [None] * seq, [], None
    for i in range((n_layer + 1) // 2 if sym else n_layer):
        if seq > 1:
            slot = (i // size) % seq
            if pool[slot] is None:
                pool[slot] = object()
            current = pool[slot]
        elif i % size == 0 or current is None:
            current = object()
        group.append(current)
    if sym:
        group += list(reversed(group[:-1] if n_layer % 2 else group))
    ids = {}
    return [ids.setdefault(id(o), len(ids)) for o in group]


@pytest.mark.parametrize("n_layer", range(1, 10))
def test_plan_matches_upstream_construction_exhaustively(n_layer):
    for size, seq, sym in itertools.product(range(1, 5), range(1, 5), (False, True)):
        assert sharing_plan(n_layer, size, seq, sym) == upstream_construction(n_layer, size, seq, sym), \
            (n_layer, size, seq, sym)


@pytest.mark.parametrize("args, plan", [
    ((6, 1, 1, False), [0, 1, 2, 3, 4, 5]),
    ((6, 2, 1, False), [0, 0, 1, 1, 2, 2]),
    ((7, 3, 1, False), [0, 0, 0, 1, 1, 1, 2]),
    ((7, 1, 3, False), [0, 1, 2, 0, 1, 2, 0]),
    ((8, 2, 2, False), [0, 0, 1, 1, 0, 0, 1, 1]),
    ((5, 1, 1, True), [0, 1, 2, 1, 0]),
    ((6, 1, 1, True), [0, 1, 2, 2, 1, 0]),
    ((6, 2, 1, True), [0, 0, 1, 1, 0, 0]),
    ((7, 1, 2, True), [0, 1, 0, 1, 0, 1, 0]),
])
def test_plan_cases(args, plan):
    assert sharing_plan(*args) == plan


def test_physical_layers_and_plan_groups():
    assert physical_layers(5, True) == [0, 1, 2, 1, 0] and physical_layers(4, True) == [0, 1, 1, 0]
    plan = SharingPlan.from_config(tiny(n_layer=5, shared_attn_sym=True, shared_mlp_size=2))
    assert plan.attn == (0, 1, 2, 1, 0) and plan.mlp == (0, 0, 1, 1, 2)
    assert plan.groups("attn") == [[0, 4], [1, 3], [2]] and plan.ties("mlp") == [[0, 1], [2, 3]]
    assert plan.is_shared and not SharingPlan.from_config(tiny()).is_shared


# --- one module object per tie ----------------------------------------------------------------
def test_tied_layers_hold_the_same_objects_and_one_set_of_parameters():
    cfg = tiny(n_layer=4, shared_attn_size=2, shared_mlp_seq=2)
    m, plain = GPT(cfg), GPT(tiny(n_layer=4))
    h = m.transformer.h
    assert h[0].attn is h[1].attn and h[2].attn is h[3].attn and h[0].attn is not h[2].attn
    assert h[0].mlp is h[2].mlp and h[1].mlp is h[3].mlp and h[0].mlp is not h[1].mlp
    assert h[0].pre_ln_attn is not h[1].pre_ln_attn  # norms stay per layer
    assert m.sharing_plan == SharingPlan(attn=(0, 0, 1, 1), mlp=(0, 1, 0, 1))
    per_attn = sum(p.numel() for p in h[0].attn.parameters())
    per_mlp = sum(p.numel() for p in h[0].mlp.parameters())
    n = sum(p.numel() for p in unique_params(m).values())
    assert n == sum(p.numel() for p in unique_params(plain).values()) - 2 * per_attn - 2 * per_mlp
    assert m.num_params(non_embedding=False) == n


def test_gradient_of_a_shared_module_is_the_sum_over_its_uses():
    """Both layers share one MLP; an unshared copy with equal weights gives per-use gradients."""
    torch.manual_seed(0)
    shared = GPT(tiny(shared_mlp_size=2))
    unshared = GPT(tiny())
    sd = shared.state_dict()  # lists the shared MLP under both prefixes: loads into both copies
    unshared.load_state_dict(sd)
    x = tokens()
    shared(x, x)[1].backward()
    unshared(x, x)[1].backward()
    for name, p in shared.transformer.h[0].mlp.named_parameters():
        per_use = [dict(unshared.transformer.h[i].mlp.named_parameters())[name].grad for i in (0, 1)]
        assert per_use[0].abs().sum() > 0 and per_use[1].abs().sum() > 0
        assert torch.allclose(p.grad, per_use[0] + per_use[1], atol=1e-7, rtol=1e-5)
    for i in (0, 1):  # attention is not shared: equal gradients per layer
        assert torch.allclose(shared.transformer.h[i].attn.c_attn_q.weight.grad,
                              unshared.transformer.h[i].attn.c_attn_q.weight.grad, atol=1e-7, rtol=1e-5)


def test_state_dict_lists_shared_modules_under_every_prefix_and_loads():
    cfg = tiny(n_layer=3, shared_attn_sym=True)
    torch.manual_seed(0)
    a = GPT(cfg).eval()
    sd = a.state_dict()
    k0, k2 = "transformer.h.0.attn.c_attn_q.weight", "transformer.h.2.attn.c_attn_q.weight"
    assert k0 in sd and k2 in sd and sd[k0].data_ptr() == sd[k2].data_ptr()
    torch.manual_seed(1)
    b = GPT(cfg).eval()
    b.load_state_dict(sd, strict=True)
    assert b.transformer.h[0].attn is b.transformer.h[2].attn  # loading keeps the tie
    x = tokens()
    assert torch.equal(a(x)[0], b(x)[0])


def test_shared_model_trains_decodes_and_checkpoints():
    cfg = tiny(n_layer=4, shared_attn_seq=2, shared_mlp_sym=True, use_gradient_checkpointing=True)
    m = GPT(cfg).train()
    x = tokens()
    m(x, x)[1].backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    with torch.no_grad():
        full = m(x[:, :8])[0]
        cache = KVCache(cfg.n_layer)
        m(x[:, :7], cache=cache)
        step = m(x[:, 7:8], cache=cache)[0]  # layers sharing a module keep their own cache
    assert torch.allclose(full, step, atol=1e-5)


def test_shared_fire_still_one_module():
    m = GPT(tiny(n_layer=3, use_fire_embeddings=True, shared_fire_embeddings=True, shared_mlp_size=3))
    h = m.transformer.h
    assert h[0].attn.fire_pos_enc is h[1].attn.fire_pos_enc is h[2].attn.fire_pos_enc


# --- per-layer overrides with sharing -------------------------------------------------------
def test_layerlists_index_the_sharing_group():
    """Upstream builds shared modules from the *_layerlist value of group i // size."""
    m = GPT(tiny(n_layer=4, shared_mlp_size=2, mlp_size_layerlist=[48, 64]))
    widths = [blk.mlp.c_fc.out_features for blk in m.transformer.h]
    assert widths == [48, 48, 64, 64]


def test_layerlists_with_sym_follow_the_mirrored_layer():
    m = GPT(tiny(n_layer=4, shared_attn_sym=True, attention_variant="infinite", n_qk_head_dim=8,
                 n_head_layerlist=[1, 4, 2, 2]))
    heads = [blk.attn.c_attn_q.out_features // 8 for blk in m.transformer.h]
    assert heads == [1, 4, 4, 1]
    x = tokens()
    m(x, x)[1].backward()


def test_compatible_seq_and_layerlist_cycle_together():
    m = GPT(tiny(n_layer=4, shared_mlp_seq=2, mlp_size_layerlist=[48, 64]))
    assert [blk.mlp.c_fc.out_features for blk in m.transformer.h] == [48, 64, 48, 64]


@pytest.mark.parametrize("kw, message", [
    (dict(n_layer=3, shared_mlp_seq=2, mlp_size_layerlist=[48, 64, 80]),
     r"layers 0 and 2 share one mlp.*mlp_size=48 vs 80"),
    (dict(n_layer=4, shared_attn_size=2, attention_list=["causal", "identity"]),
     r"layers 0 and 1 share one attn.*attention_variant='causal' vs 'identity'"),
    (dict(n_layer=3, shared_attn_seq=2, n_head_layerlist=[2, 4, 1]), r"layers 0 and 2 share one attn.*n_head=2 vs 1"),
])
def test_incompatible_overrides_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        GPT(tiny(**kw))


def test_overrides_of_the_other_kind_do_not_conflict():
    """Sharing attention while the MLP width varies per layer is fine."""
    m = GPT(tiny(n_layer=2, shared_attn_size=2, mlp_size_layerlist=[48, 64]))
    assert m.transformer.h[0].attn is m.transformer.h[1].attn
    assert [blk.mlp.c_fc.out_features for blk in m.transformer.h] == [48, 64]


# --- the MLP slot: MoE placement and auxiliary loss ----------------------------------------
def test_moe_slot_and_aux_loss():
    cfg = tiny(n_layer=2, use_moe=True, n_experts=4, moe_top_k=2, moe_aux_loss_coef=0.1)
    torch.manual_seed(0)
    m = GPT(cfg).train()
    assert isinstance(m.transformer.h[0].mlp, MoELayer) and not isinstance(m.transformer.h[1].mlp, MoELayer)
    x = tokens()
    logits, loss = m(x, x)
    aux = collect_moe_aux_loss(m)
    assert aux > 0 and torch.allclose(loss, m.last_ce_loss + aux)
    loss.backward()
    assert m.transformer.h[0].mlp.router.route_linear.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        _, eval_loss = m(x, x)
    assert torch.equal(eval_loss, m.last_ce_loss)  # validation loss is the plain cross-entropy


def test_shared_moe_slot_is_placed_by_its_building_layer():
    m = GPT(tiny(n_layer=4, use_moe=True, n_experts=2, moe_top_k=1, shared_mlp_size=2))
    h = m.transformer.h
    assert h[0].mlp is h[1].mlp and isinstance(h[0].mlp, MoELayer) and isinstance(h[2].mlp, MoELayer)

"""Hugging Face pieces the interop tests build offline (no download): one forge_dist model per
transformers architecture and option the mapping handles (``EXPORTS``, ``export_model``: the
interop tests and forge-convert's streaming tests), and a fast tokenizer trained here, as a
downloaded model's tokenizer would be, with nothing of forge_dist in it."""
import torch

from forge_dist.testing.models import make_model

ROTARY = dict(use_abs_pos_embeddings=False, use_rotary_embeddings=True, mlp_variant="swiglu",
              activation_variant="silu")
# one configuration per transformers architecture and option the mapping handles
EXPORTS = {
    "gpt2": dict(norm_variant_attn="layernorm", norm_variant_output="layernorm", bias=True),
    "gpt2_nobias_untied_relu": dict(norm_variant_attn="layernorm", norm_variant_output="layernorm",
                                    wte_weight_tying=False, activation_variant="relu", mlp_size=48),
    "llama_gqa_tied": dict(ROTARY, n_kv_group=2, rmsnorm_eps=1e-6),
    "llama_untied_bias": dict(ROTARY, wte_weight_tying=False, bias=True, mlp_up_bias=True, mlp_down_bias=True),
    "llama_eps_free_gelu": dict(ROTARY, activation_variant="gelu", mlp_size=40),
    "mistral_window": dict(ROTARY, n_kv_group=2, window_size=3),
    "mixtral": dict(ROTARY, n_kv_group=2, use_moe=True, moe_layer_freq=1, n_experts=3, moe_top_k=2,
                    wte_weight_tying=False),
    "gemma2_softcap": dict(ROTARY, use_peri_ln=True, use_embedding_scale=True, attn_logit_softcapping=0.5,
                           final_logit_softcapping=2.0, n_kv_group=2, activation_variant="gelu", bias=True,
                           mlp_up_bias=False, mlp_down_bias=False, rmsnorm_eps=1e-6),
    "gemma2_window_untied": dict(ROTARY, use_peri_ln=True, use_embedding_scale=True, window_size=4,
                                 wte_weight_tying=False),
}
ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "mixtral": "MixtralForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def export_model(name, seed=3, **extra):
    """``make_model`` of ``EXPORTS[name]``, with what the architecture fixes at its value."""
    model = make_model(seed=seed, **{**EXPORTS[name], **extra})
    with torch.no_grad():  # what the architecture fixes, back at its value after make_model's noise
        if model.config.use_moe:  # Mixtral's router has no bias
            for block in model.transformer.h:
                block.mlp.router.route_linear.bias.zero_()
        if model.config.use_embedding_scale:  # Gemma 2 scales embeddings by sqrt(hidden_size)
            model.embedding_scale.fill_(model.config.n_embd ** 0.5)
    return model


def hf_bpe_tokenizer(text: str, vocab_size: int = 320):
    """A transformers PreTrainedTokenizerFast: tokenizers' byte-level BPE trained on ``text``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")

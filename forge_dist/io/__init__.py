"""Checkpoint formats: forge_dist's safetensors directory and ReaLLM-Forge's ckpt.pt.

    from_pretrained(path)            the GPT in eval mode, from either format
    save_pretrained(model, path)     our directory (model.safetensors + config.json), atomically
    save_ckpt(model, path)           a ReaLLM-Forge ckpt.pt
    convert(src, dst, to)            what the forge-convert CLI does
"""
from forge_dist.io.convert import convert  # noqa: F401
from forge_dist.io.forge_format import load_pretrained, save_pretrained  # noqa: F401
from forge_dist.io.pretrained import from_pretrained, load_any  # noqa: F401
from forge_dist.io.reallm_forge import load_ckpt, register_rule, save_ckpt  # noqa: F401
from forge_dist.io import variant_rules  # noqa: F401,E402  (registers the variant families' rules)

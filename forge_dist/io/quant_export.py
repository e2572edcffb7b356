"""forge-quant-export: the integer tensors of a trained quantized model, for hardware.

Writes two files into ``--out``:

  quantized.safetensors   for each quantized tensor ``NAME`` (a state-dict name such as
                          ``transformer.h.0.attn.c_attn_q.weight``):
                            NAME             integer codes (int8 / int16 / int32)
                            NAME.scale       0-d float
                            NAME.zero_point  0-d int32 (int64 above 16 bits)
                          and, with --include-float, every parameter that is not quantized
  manifest.json           per tensor: module, variant, method, bits, dtype, shape, scale, zero
                          point; the float parameters; the model config

Every value dequantizes as (codes - zero_point) * scale, exactly what the model computes in eval.
Quantized tensors come from modules that define ``export_tensors()`` (quantized_linear, the
bitlinear family, quantized embeddings, and activation points when store_activations is on).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from forge_dist.errors import CheckpointError

TENSORS_FILE = "quantized.safetensors"
MANIFEST_FILE = "manifest.json"


def quantized_tensors(model: nn.Module) -> Dict[str, tuple]:
    """{state-dict-like name: (module name, module, ExportedTensor)} of every quantized tensor."""
    out = {}
    for mod_name, module in model.named_modules():
        export = getattr(module, "export_tensors", None)
        if export is None:
            continue
        for tensor_name, t in export().items():
            out[f"{mod_name}.{tensor_name}" if mod_name else tensor_name] = (mod_name, module, t)
    return out


def export_quantized(model: nn.Module, out_dir: str, include_float: bool = False) -> dict:
    """Write ``quantized.safetensors`` and ``manifest.json`` into out_dir; returns the manifest."""
    from safetensors.torch import save_file

    model.eval()
    tensors: Dict[str, torch.Tensor] = {}
    entries = {}
    with torch.no_grad():
        for name, (mod_name, module, t) in quantized_tensors(model).items():
            zp_dtype = torch.int32 if t.bits <= 16 else torch.int64
            tensors[name] = t.codes.detach().cpu().contiguous()
            tensors[f"{name}.scale"] = t.scale.detach().cpu().reshape(())
            tensors[f"{name}.zero_point"] = torch.round(t.zero_point.detach()).to(zp_dtype).cpu().reshape(())
            entries[name] = {
                "module": mod_name, "variant": type(module).__name__, "method": t.method, "bits": t.bits,
                "dtype": str(t.codes.dtype).replace("torch.", ""), "shape": list(t.codes.shape),
                "scale": float(t.scale), "zero_point": int(tensors[f"{name}.zero_point"]),
            }
        # every name, tied ones included: a tied lm_head keeps the float table of a quantized wte
        float_params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if n not in entries}
        if include_float:
            tensors.update({n: p.detach().cpu().clone() for n, p in float_params.items()})
    config = getattr(model, "config", None)
    manifest = {
        "format": "forge_dist quantized export 1",
        "dequantize": "value = (codes - zero_point) * scale",
        "tensors": entries,
        "float_parameters": sorted(float_params),
        "float_parameters_included": include_float,
        "config": config.to_dict() if config is not None else None,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, TENSORS_FILE), metadata={"format": manifest["format"]})
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# --- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forge-quant-export",
        description="Write the integer tensors, scales and zero points of a trained quantized model "
                    "(safetensors + JSON manifest).")
    p.add_argument("checkpoint", help="a forge_dist checkpoint directory or a ReaLLM-Forge ckpt.pt")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--include-float", action="store_true", help="also write the parameters that are not quantized")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from forge_dist.io.pretrained import from_pretrained

    args = build_parser().parse_args(argv)
    try:
        model = from_pretrained(args.checkpoint)
        manifest = export_quantized(model, args.out, include_float=args.include_float)
    except CheckpointError as e:
        print(f"forge-quant-export: {e}", file=sys.stderr)
        return 1
    n = len(manifest["tensors"])
    if n == 0:
        print("warning: the model has no quantized tensors (no quantized_linear, bitlinear*, quantize_wte/wpe)",
              file=sys.stderr)
    print(f"wrote {n} quantized tensors to {os.path.join(args.out, TENSORS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference: KV-cached generation (generate.py), forge-sample (sample.py), forge-eval (evaluate.py)."""

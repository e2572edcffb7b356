"""Triadic modulation transfer functions for co4 attention (mod_fn), after Adeel 2025:
f(r, c) modulates a signal r by its context c, elementwise; shapes broadcast.

    cooperation  relu6(r/2 + 2r + c (1 + |r|))     (upstream's formula, literally)
    tm1          r (1 + e^{r c}) / 2
    tm2          r + r c
    tm3          r (1 + tanh(r c))
    tm4          2 r^2 c
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from forge_dist.variants import MOD_FN


@MOD_FN.register("cooperation")
def cooperation(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return F.relu6(r / 2.0 + 2.0 * r + c * (1.0 + r.abs()))


@MOD_FN.register("tm1")
def tm1(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 0.5 * r * (1.0 + torch.exp(r * c))


@MOD_FN.register("tm2")
def tm2(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return r + r * c


@MOD_FN.register("tm3")
def tm3(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return r * (1.0 + torch.tanh(r * c))


@MOD_FN.register("tm4")
def tm4(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 2.0 * r * r * c

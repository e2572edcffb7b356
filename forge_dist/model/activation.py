"""Activation variants (activation_variant), built as modules so learnable ones hold parameters."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from forge_dist.model.registries import ACTIVATION


def _wrap(name: str, fn):
    class _Activation(nn.Module):
        def __init__(self, config=None):
            super().__init__()

        def forward(self, x):
            return fn(x)

    _Activation.__name__ = _Activation.__qualname__ = f"Activation_{name}"
    ACTIVATION.register(name)(_Activation)
    return _Activation


_wrap("gelu", F.gelu)  # exact erf form, as upstream
_wrap("relu", F.relu)
_wrap("silu", F.silu)
_wrap("tanh", lambda x: x.tanh())
_wrap("identity", lambda x: x)


def build_activation(name: str, config, option: str = "activation_variant") -> nn.Module:
    return ACTIVATION.build(name, config, option=option)

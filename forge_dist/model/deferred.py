"""Deferred initialisation: the model's drawn weights exist only as shapes until materialised.

    with deferred_weights():      # nn.Linear, nn.Embedding and LMHead allocate on the meta device
        model = ...               # every other parameter and buffer gets its constructor value
    materialize(model, full_value, local=...)   # GPT.materialize: full_value draws by init_rules

``materialize`` gets each meta parameter in full (``full_value(name, shape)``: drawn from its own
seeded stream (model/init.py), or read from a checkpoint), asks
``local(name, param, full)`` for the part this process keeps (the whole tensor by default; a
tensor-parallel shard in forge_dist.parallel.materialize) and frees the rest before the next one,
so the peak is the kept parameters plus one full parameter, never the whole model. The values do
not depend on the order or the layout: a sharded build keeps exactly the slices of a single-process
build. Meta construction draws nothing from the global generator, so the constructor-valued
parameters (norm gains, learned scalars, steering tables) are the same in every build too.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.model.init import InitRule, param_generator

Local = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
FullValue = Callable[[str, Tuple[int, ...]], torch.Tensor]


def _on_meta(init):
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        with torch.device("meta"):
            init(self, *args, **kwargs)
    return wrapped


def _skip(self) -> None:
    pass


@contextlib.contextmanager
def deferred_weights(*classes: type) -> Iterator[None]:
    """Within the block, the constructors of nn.Linear, nn.Embedding (subclasses included) and of
    ``classes`` allocate their parameters on the meta device. Not thread-safe: it patches the
    classes' ``__init__`` for the duration of the block."""
    patched = [(c, "__init__", _on_meta(c.__dict__["__init__"])) for c in (nn.Linear, nn.Embedding, *classes)]
    # their default init draws nothing on meta, but normal_ on meta goes through torch._refs, whose
    # first use imports torch._dynamo (seconds): skip it, the values are drawn by init_rules
    patched += [(c, "reset_parameters", _skip) for c in (nn.Linear, nn.Embedding)]
    originals = [(c, name, c.__dict__[name]) for c, name, _ in patched]
    try:
        for cls, name, value in patched:
            setattr(cls, name, value)
        yield
    finally:
        for cls, name, value in originals:
            setattr(cls, name, value)


def is_meta_default() -> bool:
    """True inside ``with torch.device("meta")`` (a model built only to be inspected)."""
    return torch.empty(()).is_meta


def drawn(rules: Dict[str, InitRule], config, seed: int) -> FullValue:
    """full_value drawing each parameter by its rule from its own stream."""
    def full_value(name: str, shape: Tuple[int, ...]) -> torch.Tensor:
        rule = rules.get(name)
        if rule is None:
            raise RuntimeError(f"parameter {name} is on the meta device but has no init rule "
                               f"(forge_dist.model.init.init_rules): give it one, or build it off meta")
        return rule.build(config, shape, param_generator(seed, name))
    return full_value


def logical_shape(p: torch.Tensor) -> Tuple[int, ...]:
    """The full (unsharded) shape of a parameter: its ShardInfo's, or its own."""
    info = getattr(p, "_forge_shard", None)
    return tuple(info.full_shape) if info is not None else tuple(p.shape)


def replace_value(p: torch.Tensor, value: torch.Tensor) -> None:
    """Give parameter ``p`` (on meta, or anywhere) the tensor ``value`` in place, keeping its
    identity, requires_grad and tags (shard metadata): every reference to ``p`` sees it."""
    new = nn.Parameter(value.to(p.dtype), requires_grad=p.requires_grad)
    new.__dict__.update(p.__dict__)
    torch.utils.swap_tensors(p, new)


@torch.no_grad()
def materialize(model: nn.Module, full_value: FullValue, local: Optional[Local] = None,
                after: Optional[Callable[[str, nn.Parameter], None]] = None) -> int:
    """Give every meta parameter of ``model`` its value (see the module doc); returns how many.
    Names are the first names of named_parameters (they survive parallelization). ``after(name,
    param)`` runs as soon as a parameter has its value (ZeRO-3 partitions it there). A buffer left
    on meta is an error naming it."""
    done = 0
    for name, p in model.named_parameters():
        if not p.is_meta:
            continue
        full = full_value(name, logical_shape(p))
        value = full if local is None else local(name, p, full)
        del full
        replace_value(p, value)
        del value
        if after is not None:
            after(name, p)
        done += 1
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers {left[:4]} are on the meta device after materialisation: compute "
                           f"them from parameters at forward time, or build their module off meta")
    return done

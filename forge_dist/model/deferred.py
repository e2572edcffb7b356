"""Deferred initialisation: the model's drawn weights exist only as shapes until materialised.

    with deferred_weights():      # nn.Linear, nn.Embedding and LMHead allocate on the meta device
        model = ...               # every other parameter and buffer gets its constructor value
    materialize(model, value, keep=...)   # GPT.materialize: value draws by init_rules

``materialize`` asks ``keep(name, param)`` what this process keeps of each meta parameter (None:
all of it; a tensor-parallel shard, a ZeRO-3 partition of it: a forge_dist.parallel.kept.Kept)
and draws it with ``value(name, full_shape, kept, dtype)`` (``drawn``: the parameter's own seeded
stream, model/init.py). A kept part is drawn in pieces of the full value, only the kept elements
copied (``Kept.take``), so the peak is the kept parameters plus one piece (plus, for a rule that
needs its whole tensor at once, such as a rejection-sampled token table, that tensor), never a
full parameter. The values do not depend on the order or the layout: a sharded build keeps
exactly the slices of a single-process build. Meta construction draws nothing from the global
generator, so the constructor-valued parameters (norm gains, learned scalars, steering tables) are
the same in every build too.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.model.init import InitRule, param_generator

Keep = Callable[[str, torch.Tensor], Any]  # (name, meta parameter) -> a Kept, or None: all of it
Value = Callable[[str, Tuple[int, ...], Any, torch.dtype], torch.Tensor]  # (name, full shape, kept, dtype)


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


def drawn(rules: Dict[str, InitRule], config, seed: int) -> Value:
    """``value`` drawing each parameter by its rule from its own stream: all of it (``kept`` None,
    the single-process build), or the kept part from the full value's pieces."""
    def value(name: str, shape: Tuple[int, ...], kept=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        rule = rules.get(name)
        if rule is None:
            raise RuntimeError(f"parameter {name} is on the meta device but has no init rule "
                               f"(forge_dist.model.init.init_rules): give it one, or build it off meta")
        generator = param_generator(seed, name)
        if kept is None:
            return rule.build(config, shape, generator)
        return kept.take(rule.chunks(config, shape, generator), dtype or torch.get_default_dtype())
    return value


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
def materialize(model: nn.Module, value: Value, keep: Optional[Keep] = None,
                after: Optional[Callable[[str, nn.Parameter], None]] = None) -> int:
    """Give every meta parameter of ``model`` its value (see the module doc); returns how many.
    Names are the first names of named_parameters (they survive parallelization). ``after(name,
    param)`` runs as soon as a parameter has its value (ZeRO-3 partitions it there). A buffer left
    on meta is an error naming it."""
    done = 0
    for name, p in model.named_parameters():
        if not p.is_meta:
            continue
        replace_value(p, value(name, logical_shape(p), None if keep is None else keep(name, p), p.dtype))
        if after is not None:
            after(name, p)
        done += 1
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers {left[:4]} are on the meta device after materialisation: compute "
                           f"them from parameters at forward time, or build their module off meta")
    return done

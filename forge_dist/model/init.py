"""Weight initialisation (ReaLLM-Forge's _init_weights) and the token-embedding init variants.

Every linear weight ~ N(linear_mean_init, linear_std_init), biases 0; the position table (and any
other embedding) ~ N(embedding_mean_init, embedding_std_init); ``init_variant`` decides the token
table (EMBED_INIT, upstream's initialization_variations.py); finally residual output projections
(parameter names ending in ``c_proj.weight``) are drawn with std 0.02/sqrt(2 n_layer) (GPT-2's
scaled init). A tied lm_head shares the token table's values. Each parameter is drawn from its
own stream (``param_generator``), so a sharded build can draw one parameter at a time, and of
it only its shard (``InitRule.chunks``, forge_dist.model.deferred), and get the values of a
single-process build.

Each variant builds a (vocab, width) table for the token table's actual shape, so factorised
tables (width n_embd_wte) work too; upstream builds (vocab, n_embd) and fails on them.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from forge_dist.errors import ConfigError
from forge_dist.variants import EMBED_INIT


def _gaussian_args(config) -> Tuple[float, float]:
    return config.embedding_mean_init, config.embedding_std_init


@EMBED_INIT.register("gaussian")
def gaussian_init(config, shape, generator=None) -> torch.Tensor:
    """N(embedding_mean_init, embedding_std_init)."""
    return torch.empty(shape).normal_(*_gaussian_args(config), generator=generator)


@EMBED_INIT.register("onehot")
def onehot_init(config, shape, generator=None) -> torch.Tensor:
    """Row i = init_scale * e_i: every token its own axis (needs width >= vocab)."""
    V, D = shape
    if D < V:
        raise ConfigError(f"init_variant=onehot needs an embedding width >= vocab_size; got width {D} < "
                          f"vocab_size {V}: raise n_embd (or n_embd_wte) or choose another init_variant")
    w = torch.zeros(V, D)
    w[torch.arange(V), torch.arange(V)] = config.init_scale
    return w


@EMBED_INIT.register("hypercube")
def hypercube_init(config, shape, generator=None) -> torch.Tensor:
    """Row i = init_scale * (binary digits of i): corners of {0,1}^D in index order (2^D >= vocab)."""
    V, D = shape
    if D < 63 and 2 ** D < V:
        raise ConfigError(f"init_variant=hypercube needs 2^width >= vocab_size; 2^{D} = {2 ** D} < "
                          f"{V}: raise n_embd (or n_embd_wte) to at least {math.ceil(math.log2(V))}")
    d = torch.arange(D)
    bits = (torch.arange(V).unsqueeze(1) >> d.clamp(max=62)) & 1  # (V, D); digits >= 63 are 0
    bits[:, d >= 63] = 0
    return bits.float() * config.init_scale


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True)


def _signs(shape, generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


@EMBED_INIT.register("rand_hypercube")
def rand_hypercube_init(config, shape, generator=None) -> torch.Tensor:
    """Random +-1 corners, L2-normalised, times init_scale."""
    return _unit_rows(_signs(shape, generator)) * config.init_scale


@EMBED_INIT.register("unique_hypercube")
def unique_hypercube_init(config, shape, generator=None) -> torch.Tensor:
    """Random +-1 corners with no duplicate and no antipodal pair, L2-normalised, times init_scale."""
    V, D = shape
    if D < 63 and V > 2 ** (D - 1):
        raise ConfigError(f"init_variant=unique_hypercube has only 2^(width-1) = {2 ** (D - 1)} corners "
                          f"without antipodes for vocab_size {V}: raise n_embd (or n_embd_wte)")
    rows, seen = [], set()
    while len(rows) < V:
        for r in _signs((V - len(rows), D), generator):
            key = (r * r[0]).to(torch.int8).numpy().tobytes()  # r and -r share a key
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return _unit_rows(torch.stack(rows)) * config.init_scale


@EMBED_INIT.register("angle_hypersphere")
def angle_hypersphere_init(config, shape, generator=None) -> torch.Tensor:
    """cos of uniform angles in [0, 2 pi), L2-normalised, times init_radius."""
    angles = torch.rand(shape, generator=generator) * (2 * math.pi)
    return _unit_rows(torch.cos(angles)) * config.init_radius


@EMBED_INIT.register("gaussian_norm_range")
def gaussian_norm_range_init(config, shape, generator=None, max_rounds: int = 1000) -> torch.Tensor:
    """Gaussian rows (embedding_mean_init, embedding_std_init) whose L2 norm lies in
    [gaussian_min_norm, gaussian_max_norm], by rejection sampling."""
    V, D = shape
    lo, hi = config.gaussian_min_norm, config.gaussian_max_norm
    if lo > hi:
        raise ConfigError(f"gaussian_min_norm={lo} exceeds gaussian_max_norm={hi}")
    kept, n = [], 0
    for _ in range(max_rounds):
        cand = torch.empty(2 * (V - n) + 16, D).normal_(config.embedding_mean_init, config.embedding_std_init,
                                                       generator=generator)
        norms = cand.norm(dim=1)
        ok = cand[(norms >= lo) & (norms <= hi)][: V - n]
        kept.append(ok)
        n += ok.shape[0]
        if n == V:
            return torch.cat(kept)
    typical = math.sqrt(D * (config.embedding_std_init ** 2 + config.embedding_mean_init ** 2))
    raise ConfigError(f"init_variant=gaussian_norm_range: rows of N({config.embedding_mean_init}, "
                      f"{config.embedding_std_init}) in {D} dims have norms near {typical:.4g}, almost never in "
                      f"[gaussian_min_norm={lo}, gaussian_max_norm={hi}]; widen the range")


def read_plain_npy(path: str, option: str) -> np.ndarray:
    """A .npy array read without pickle; a missing file or an object array is a ConfigError that
    names ``option`` (e.g. "init_wte_npy=...")."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"{option}={path!r} does not exist") from None
    except ValueError as e:
        raise ConfigError(f"{option}={path!r} is not a plain numeric .npy array (object arrays need "
                          f"pickle and are refused): {e}") from None


@EMBED_INIT.register("numpy_import")
def numpy_import_init(config, shape, generator=None) -> torch.Tensor:
    """The table in init_wte_npy (a plain .npy array, read without pickle), times init_scale."""
    path = config.init_wte_npy
    data = read_plain_npy(path, "init_variant=numpy_import: init_wte_npy")
    if not isinstance(data, np.ndarray) or data.shape != tuple(shape):
        got = getattr(data, "shape", type(data).__name__)
        raise ConfigError(f"init_variant=numpy_import: init_wte_npy={path!r} holds shape {got}, the token "
                          f"table is (vocab_size, width) = {tuple(shape)}")
    return torch.from_numpy(np.asarray(data, dtype=np.float32)) * config.init_scale


def build_embedding_init(config, shape, generator=None) -> torch.Tensor:
    w = EMBED_INIT.build(config.init_variant, config, tuple(shape), generator=generator, option="init_variant")
    if tuple(w.shape) != tuple(shape):  # a registered variant broke the contract
        raise ConfigError(f"init_variant={config.init_variant!r} built shape {tuple(w.shape)} for a token "
                          f"table of shape {tuple(shape)}")
    return w


# --- the initial value of every parameter, one seeded stream per parameter ----------------------
# Each drawn parameter gets its own generator, seeded from (the model's init seed, its name), so a
# parameter's value does not depend on what was drawn before it: a sharded run can build the
# model on the meta device and draw each parameter's full value piece by piece, keeping only its
# shard (forge_dist.model.deferred), and get exactly the values of a single-process build.

# Drawn in pieces of CHUNK elements (a multiple of 16: see InitRule.chunks), 1 MiB in fp32.
CHUNK = 1 << 18


@dataclass(frozen=True)
class InitRule:
    """How a parameter is drawn: ``normal`` (mean, std), ``zeros``, or ``embedding`` (the
    init_variant of the token table)."""
    kind: str
    mean: float = 0.0
    std: float = 0.0

    def build(self, config, shape, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "zeros":
            return torch.zeros(shape)
        if self.kind == "embedding":
            return build_embedding_init(config, shape, generator=generator)
        return torch.empty(shape).normal_(self.mean, self.std, generator=generator)

    def normal_args(self, config) -> Optional[Tuple[float, float]]:
        """(mean, std) when ``build`` is one ``normal_`` draw over the whole tensor, else None."""
        if self.kind == "normal":
            return self.mean, self.std
        if self.kind == "embedding" and config.init_variant == "gaussian":
            return _gaussian_args(config)
        return None

    def chunks(self, config, shape, generator: torch.Generator, chunk: Optional[int] = None) -> Iterator[torch.Tensor]:
        """``build(config, shape, generator).reshape(-1)``, bit for bit, in consecutive pieces of
        about ``chunk`` elements, so that a process keeping part of the tensor never holds all of it
        (forge_dist.parallel.kept). Each piece is a view of one reused buffer, valid until the next
        piece is drawn. Zeros and normal draws stream; other rules (the rejection-sampled or
        row-normalised token tables) yield the whole tensor as one piece.

        Why pieces of a normal draw are exact: torch's CPU ``normal_`` of a contiguous tensor of
        n >= 16 elements (aten/src/ATen/native/cpu/DistributionTemplates.h ``normal_fill``, and its
        AVX2 variant) draws the n uniforms in order, then maps each block of 16 by Box-Muller
        (element i with i + 8), and when n % 16 != 0 draws 16 more uniforms for the last 16
        elements. So pieces of a multiple of 16 elements, the last one at least 16, produce the
        same values and leave the generator in the same state (tests/unit/test_init_stream.py
        checks it for every rule, both dtypes and odd sizes; under 16 elements it is one piece)."""
        chunk = CHUNK if chunk is None else chunk
        if chunk <= 0 or chunk % 16:
            raise ValueError(f"chunk={chunk} must be a positive multiple of 16")
        numel = math.prod(shape)
        if self.kind == "zeros":
            buf = torch.zeros(min(numel, chunk))
            for done in range(0, numel, chunk):
                yield buf[:min(chunk, numel - done)]
            return
        args = self.normal_args(config)
        if args is None:
            yield self.build(config, shape, generator).reshape(-1)
            return
        buf, done = torch.empty(min(numel, chunk + 15)), 0
        while numel - done >= chunk + 16:  # the last piece keeps >= 16 elements
            yield buf[:chunk].normal_(*args, generator=generator)
            done += chunk
        yield buf[:numel - done].normal_(*args, generator=generator)


def param_generator(seed: int, name: str) -> torch.Generator:
    """The generator of parameter ``name``: seeded from blake2b(seed, name), stable across runs."""
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))


def draw_init_seed() -> int:
    """One draw from the global torch generator: the model's init seed (so ``torch.manual_seed``
    before building still decides the weights)."""
    return int(torch.randint(0, 2 ** 62, (1,), device="cpu").item())


def init_rules(model: nn.Module, config) -> Dict[str, InitRule]:
    """Parameter name (its first name, as in named_parameters) -> its InitRule, for the plain
    model (before any parallelization): every linear weight ~ N(linear_mean_init, linear_std_init),
    biases 0, embeddings ~ N(embedding_mean_init, embedding_std_init), the token table by
    init_variant, residual projections (``c_proj.weight``) ~ N(0, 0.02/sqrt(2 n_layer)) (GPT-2).
    Parameters without a rule keep the value their module's constructor gave them."""
    wte = model.transformer.wte
    linear = InitRule("normal", config.linear_mean_init, config.linear_std_init)
    by_id: Dict[int, InitRule] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            by_id[id(module.weight)] = linear
            if module.bias is not None:
                by_id[id(module.bias)] = InitRule("zeros")
        elif isinstance(module, nn.Embedding) and module is not wte:
            by_id[id(module.weight)] = InitRule("normal", config.embedding_mean_init, config.embedding_std_init)
    by_id[id(model.lm_head.weight)] = linear
    by_id[id(wte.weight)] = InitRule("embedding")  # also lm_head's, when tied
    rules = {}
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            rules[name] = InitRule("normal", 0.0, 0.02 / math.sqrt(2 * config.n_layer))
        elif id(p) in by_id:
            rules[name] = by_id[id(p)]
    return rules


@torch.no_grad()
def init_weights(model: nn.Module, config, seed: int) -> None:
    """Draw every parameter that has a rule, in full, in place (a single-process build)."""
    rules = init_rules(model, config)
    for name, p in model.named_parameters():
        if name in rules:
            p.copy_(rules[name].build(config, tuple(p.shape), param_generator(seed, name)))

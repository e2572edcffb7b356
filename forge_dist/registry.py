"""One registry per variant family: option value -> builder.

Every variant is added in one place with ``@REGISTRY.register("name")``; the config validator and
the CLI read the valid values from the registry, so a new variant needs no other edit.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterator, Optional, Tuple

from forge_dist.errors import ConfigError


class Registry:
    def __init__(self, family: str, option: str, provider: Optional[str] = None):
        self.family = family  # e.g. "softmax variant"
        self.option = option  # the config option that selects from it, e.g. "softmax_variant_attn"
        self._builders: Dict[str, Callable] = {}
        # a module whose import registers the built-in names: imported by name on the first read,
        # so a registry below the model (forge_dist.variants) never imports upwards
        self._provider = provider

    def _load(self) -> Dict[str, Callable]:
        if self._provider is not None:
            provider, self._provider = self._provider, None
            importlib.import_module(provider)
        return self._builders

    def register(self, *names: str) -> Callable:
        def decorator(builder: Callable) -> Callable:
            for name in names:
                if name in self._builders:
                    raise KeyError(f"{self.family} {name!r} registered twice")
                self._builders[name] = builder
            return builder

        return decorator

    def names(self) -> Tuple[str, ...]:
        return tuple(self._load())

    def __contains__(self, name: str) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def check(self, name, option: str | None = None) -> None:
        if name not in self._load():
            raise ConfigError(
                f"{option or self.option}={name!r} is not a known {self.family}; "
                f"valid values: {', '.join(sorted(self._builders))}"
            )

    def get(self, name: str, option: str | None = None) -> Callable:
        self.check(name, option)
        return self._builders[name]

    def build(self, name: str, *args, option: str | None = None, **kwargs):
        return self.get(name, option)(*args, **kwargs)

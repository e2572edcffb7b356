"""One registry per variant family: option value -> builder.

Every variant is added in one place with ``@REGISTRY.register("name")``; the config validator and
the CLI read the valid values from the registry, so a new variant needs no other edit.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Tuple

from forge_dist.errors import ConfigError


class Registry:
    def __init__(self, family: str, option: str):
        self.family = family  # e.g. "softmax variant"
        self.option = option  # the config option that selects from it, e.g. "softmax_variant_attn"
        self._builders: Dict[str, Callable] = {}

    def register(self, *names: str) -> Callable:
        def decorator(builder: Callable) -> Callable:
            for name in names:
                if name in self._builders:
                    raise KeyError(f"{self.family} {name!r} registered twice")
                self._builders[name] = builder
            return builder

        return decorator

    def names(self) -> Tuple[str, ...]:
        return tuple(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def check(self, name, option: str | None = None) -> None:
        if name not in self._builders:
            raise ConfigError(
                f"{option or self.option}={name!r} is not a known {self.family}; "
                f"valid values: {', '.join(sorted(self._builders))}"
            )

    def get(self, name: str, option: str | None = None) -> Callable:
        self.check(name, option)
        return self._builders[name]

    def build(self, name: str, *args, option: str | None = None, **kwargs):
        return self.get(name, option)(*args, **kwargs)

"""Embedded option presets (YAML, flat option names). ``tiny.yaml`` is what forge-train runs with
no arguments; ``read_preset`` reads one without depending on where the package is installed."""
from importlib import resources

DEFAULT_PRESET = "tiny.yaml"


def read_preset(name: str = DEFAULT_PRESET) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")

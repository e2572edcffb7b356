"""forge_dist: distributed scaling for the ReaLLM-Forge family of GPT models."""
from forge_dist.config.model_config import ModelConfig  # noqa: F401
from forge_dist.errors import CheckpointError, ConfigError  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):  # keep `import forge_dist` light; build the model on first use
    if name == "GPT":
        from forge_dist.model.gpt import GPT

        return GPT
    if name == "from_pretrained":
        from forge_dist.io.pretrained import from_pretrained

        return from_pretrained
    raise AttributeError(name)

from forge_dist.config.model_config import ModelConfig  # noqa: F401

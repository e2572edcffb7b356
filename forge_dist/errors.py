"""Error types that carry a user-facing message naming the option and what to change."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and the valid values."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe (needs pickle) or does not fit the model."""

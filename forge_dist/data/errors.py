"""The error every data-side failure raises: it names the file or option and says what to do."""
from forge_dist.errors import ConfigError


class DataError(ConfigError):
    """A dataset, tokenizer or prepare option is missing, corrupt, unsafe or inconsistent.

    A subclass of ConfigError so command-line front ends report it like any bad option (exit 2).
    """

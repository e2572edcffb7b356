"""Moved to ``forge_dist.atomic``; this name stays importable (the same module object)."""
import sys

import forge_dist.atomic as _moved

sys.modules[__name__] = _moved

"""Hostile checkpoint files for tests: a code-running pickle payload planted in a ``torch.save``
file, and a forge-train checkpoint's manifest re-sealed around it (checksums detect corruption,
not an attacker, who rewrites them too)."""
from __future__ import annotations

import json
import os

import torch


class Payload:
    """Unpickling this creates ``path`` (what an attacker's file would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_payload(path: str, marker: str) -> None:
    """Rewrite the torch.save file ``path`` with a Payload(marker) added to its top-level dict."""
    from forge_dist.io.deepspeed_safe import safe_load

    state = safe_load(path)
    state["forge_dist_test_payload"] = Payload(marker)
    torch.save(state, path)


def reseal(checkpoint_dir: str) -> None:
    """Recompute the sha256 of every file a forge-train checkpoint's manifest lists, and its seal."""
    from forge_dist.io.checkpoint_read import MANIFEST, SELF_DIGEST, _sha256, seal

    path = os.path.join(checkpoint_dir, MANIFEST)
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    for rel in manifest["files"]:
        manifest["files"][rel] = _sha256(os.path.join(checkpoint_dir, rel))
    manifest.pop(SELF_DIGEST, None)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(seal(manifest), fh, indent=1)

"""`import fastppo.integrations.auto` patches the trainers named in FASTPPO_PATCH (a comma list of
"trl", "verl", "openrlhf"), e.g. `FASTPPO_PATCH=trl python train.py` with the import at the top of
train.py (or in a sitecustomize). The handles are kept in `HANDLES` (target -> PatchHandle)."""

from __future__ import annotations

import os

from . import patch

HANDLES = {}


def apply_env(value: str | None = None) -> dict:
    """Patch every target in `value` (default: $FASTPPO_PATCH); returns target -> handle."""
    value = os.environ.get("FASTPPO_PATCH", "") if value is None else value
    for target in (t.strip().lower() for t in value.split(",")):
        if target:
            HANDLES[target] = patch(target)
    return HANDLES


apply_env()

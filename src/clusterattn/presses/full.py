"""The uncompressed reference."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class FullKV:
    """No compression: the full prompt cache. ``generate(..., press=None)`` does the same."""

    def __call__(self, model):
        return contextlib.nullcontext()

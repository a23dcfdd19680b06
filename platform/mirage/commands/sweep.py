"""``mirage sweep`` and ``mirage ensemble``."""

from __future__ import annotations

"""``mirage extract`` and ``mirage features verify``."""

from __future__ import annotations

"""``mirage train`` and ``mirage baseline``."""

from __future__ import annotations

"""``mirage serve``, ``mirage predict`` and ``mirage score``."""

from __future__ import annotations

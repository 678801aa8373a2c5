"""One digest for every fingerprint, identity and cache key that hashes a JSON-able object."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(obj: Any) -> str:
    """First 16 hex digits of sha256 over `obj` as sorted JSON (non-JSON values by `str`)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

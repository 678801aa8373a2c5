"""What every config section shares: the embedded default's name and the value checks of `validate()`."""

from __future__ import annotations

from .errors import UserError


def check_positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be positive, got {value}")


def check_fraction(name: str, value: float, *, closed: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise UserError(f"{name} must lie in {interval}, got {value}")


EMBEDDED = "embedded"
"""The name that selects what ships with the package: SmolLM2-135M-Instruct and the embedded corpus."""

"""Errors a user can fix.

A `UserError` carries a one-line message that names the problem and what to do about it. The CLI
prints it without a traceback and exits with code 2 (``--debug`` shows the traceback). Anything else
that escapes is a bug in this package and is shown as one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input: a message for the user, exit code 2, no traceback without --debug."""

    exit_code = EXIT_USER_ERROR


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` for the closest of `choices`, or `""` when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""

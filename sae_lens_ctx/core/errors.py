"""Errors a user can fix.

A `UserError` carries a one-line message that names the problem and what to do about it. The CLI
prints it without a traceback and exits with code 2 (``--debug`` shows the traceback). Anything else
that escapes is a bug in this package and is shown as one.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input: a message for the user, exit code 2, no traceback without --debug."""

    exit_code = EXIT_USER_ERROR


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` for the closest of `choices`, or `""` when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded", "StorageFull")
"""How a full disk reads when a layer does not raise an OSError (sqlite3, safetensors' Rust writer)."""


def environment_error(e: BaseException) -> UserError | None:
    """The `UserError` for a problem of the machine rather than of this package (a full disk, a file the
    user may not read or write), from whatever layer raised it (Python, sqlite, safetensors); else None."""
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 8:
            break
    for err in chain:
        where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
        full = (isinstance(err, OSError) and err.errno in _DISK_FULL) or \
            any(t.lower() in str(err).lower() for t in _DISK_FULL_TEXT)
        if full:
            return UserError(f"no space left on the disk{where}: free some space (or pass another --out) and run "
                             "the same command again; it resumes where it stopped")
        if isinstance(err, PermissionError):
            return UserError(f"permission denied{where}: make it readable (and its directory writable) for this "
                             "user, or point the option at another path")
    return None

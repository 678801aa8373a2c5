"""Progress of long stages, in a terminal and in a log file alike.

`tqdm(...)` takes tqdm's own arguments. On a terminal it is tqdm's bar. When stderr is not a terminal
(`sae-lens-ctx run --out DIR > log 2>&1`, a batch job, a CI log), where tqdm's bar switches itself off,
it writes one plain line every `PROGRESS_EVERY_S` seconds instead, and one when the stage's loop ends:

    mine: 61440/120000 tok (51%), 512 tok/s, 1m54s left

through the `sae_lens_ctx` logger, so a log file shows that the run is alive and how far it is.
`SAE_LENS_CTX_PROGRESS_S` sets the pace (seconds between lines).
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any

from tqdm.auto import tqdm as _bar

log = logging.getLogger("sae_lens_ctx.progress")

PROGRESS_EVERY_S = 30.0
"""Seconds between progress lines when stderr is not a terminal (env: SAE_LENS_CTX_PROGRESS_S)."""


def _every_s() -> float:
    try:
        return float(os.environ.get("SAE_LENS_CTX_PROGRESS_S", PROGRESS_EVERY_S))
    except ValueError:
        return PROGRESS_EVERY_S


class _LogLines(_bar):
    """tqdm that writes a log line at its (slow) refresh pace instead of redrawing a bar."""

    _logged: float | None = None

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        d = self.format_dict
        if d["n"] == self._logged and d["n"] != 0:
            return True  # nothing new since the last line (tqdm redraws on close)
        self._logged = d["n"]
        n, total, rate = d["n"], d["total"], d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else None)
        unit = d["unit"]
        done = f"{n:.0f}/{total:.0f} {unit} ({100 * n / total:.0f}%)" if total else f"{n:.0f} {unit}"
        speed = f", {rate:.0f} {unit}/s" if rate and rate >= 10 else f", {rate:.2g} {unit}/s" if rate else ""
        left = ""
        if rate and total and n < total:
            left = f", {self.format_interval((total - n) / rate)} left"
        elif total and n >= total:
            left = f", done in {self.format_interval(d['elapsed'])}"
        log.info("%s: %s%s%s", self.desc or "progress", done, speed, left)
        return True


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """tqdm's bar on a terminal; progress lines in a log otherwise (see the module docstring).
    `disable=True` turns both off; tqdm's `disable=None` (off without a terminal) is replaced by lines."""
    if kwargs.get("disable") is True:
        return _bar(*args, **kwargs)
    if sys.stderr.isatty():
        return _bar(*args, **{**kwargs, "disable": False})
    every = _every_s()
    kwargs = {**kwargs, "disable": False, "mininterval": every, "maxinterval": every, "miniters": 1,
              "file": io.StringIO()}  # tqdm's own output is not shown: the lines go to the log
    bar = _LogLines(*args, **kwargs)
    bar.last_print_t = bar.start_t  # the first line after `every` seconds, not at once
    return bar

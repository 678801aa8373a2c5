"""A real headless browser (Debian's chromium) for the report tests, and a small DOM reader of the report's HTML."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

# A hang guard, not a timing assertion: many times what chromium takes even on a busy 2-core machine.
HANG_GUARD_S = 1800

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(args: list[str], profile: Path) -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class Dom(HTMLParser):
    """Elements by id with their text, `<tr>` rows per section, and every tag seen."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.text: dict[str, list[str]] = {}
        self.ctx_text: dict[str, list[str]] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.tags: set[str] = set()
        self.srcs: list[str] = []
        self._section: str | None = None
        self._in_ctx = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
            return
        if tag == "section":
            self._section = attrs.get("id")
        if "ctx" in (attrs.get("class") or "").split():
            self._in_ctx += 1
            self.ctx_text.setdefault(self._section, []).append("")
        if tag == "tr" and self._section:
            self.rows.setdefault(self._section, []).append([])
        if tag == "td" and self._section and self.rows.get(self._section):
            self.rows[self._section][-1].append("")
        self.stack.append((tag, attrs.get("class")))

    def handle_endtag(self, tag):
        while self.stack:
            top, cls = self.stack.pop()
            if "ctx" in (cls or "").split():
                self._in_ctx -= 1
            if top == tag:
                break

    def handle_data(self, data):
        if self._section:
            self.text.setdefault(self._section, []).append(data)
            if self._in_ctx:
                self.ctx_text[self._section][-1] += data
            if any(tag == "td" for tag, _ in self.stack) and self.rows.get(self._section):
                self.rows[self._section][-1][-1] += data

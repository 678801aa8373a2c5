"""The documentation site (mkdocs, material theme; `pip install -e ".[docs]"`) builds in strict mode, its
configuration page is generated from the config dataclasses, and the README stays short."""

import html
import os
import subprocess
import sys
from pathlib import Path

from sae_lens_ctx.core.config import field_paths
from sae_lens_ctx.core.config_docs import field_doc, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_the_docs_build_in_strict_mode_and_the_configuration_page_holds_every_field(tmp_path):
    """`mkdocs build --strict` (broken links, missing pages or references, docstring warnings fail it), then
    every dotted config key and its docstring's first words are on the built configuration page."""
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = html.unescape((site / "configuration" / "index.html").read_text(encoding="utf-8"))
    missing = [key for key in field_paths() if f"<code>{key}</code>" not in page]
    assert not missing, missing
    for section in ("corpus", "score"):
        assert field_doc(__import__("sae_lens_ctx.core.config", fromlist=["RunConfig"]).RunConfig, section) in page
    for name in ("simulation", "qk", "scale", "authors-code", "findings", "api"):
        assert (site / name / "index.html").is_file(), name
    assert (site / "images" / "report-first-screen.png").is_file()


def test_the_configuration_reference_documents_every_field_once():
    text = reference_markdown()
    for key in field_paths():
        assert text.count(f"| `{key}` |") == 1, key
    assert "Tokens per context" in text  # corpus.context_size's docstring, word for word


def test_the_readme_stays_short_and_points_at_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 150
    assert "docs/images/report-first-screen.png" in readme and "mkdocs" in readme

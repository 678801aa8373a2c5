"""The configuration reference, generated from the config dataclasses: every field's dotted key, type,
default and the docstring under it (the same text as its `--help`), one table per section.

The docs site's configuration page is this function's output (`docs/hooks/config_page.py` renders it at
build time), so no field is described twice and a new field appears there without an edit.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .config import RunConfig, _dataclass_type, _hints


def field_doc(cls: type, name: str) -> str:
    """The docstring written under a dataclass field ('' when there is none)."""
    from simple_parsing.docstring import get_attribute_docstring

    doc = get_attribute_docstring(cls, name)
    return " ".join((doc.docstring_below or doc.comment_inline or doc.comment_above or "").split())


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "").replace("pathlib.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown(cls: type = RunConfig) -> str:
    """The configuration page in Markdown: a section per nested config, a row per field."""
    lines = ["# Configuration", "",
             "Generated from the config dataclasses (`sae_lens_ctx.core.config`): each field's docstring is also its "
             "`--help` text. Set a field on the command line as `section.key=value` (or `--section.key value`), "
             "in a YAML file given to `sae-lens-ctx run CONFIG.yaml`, or from Python as "
             "`RunConfig(section=SectionConfig(key=value))`.", ""]
    top = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub is None:
            top.append(f)
            continue
        lines += [f"## `{f.name}`", "", field_doc(cls, f.name) + f" (`{sub.__name__}`)", "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        hints = _hints(sub)
        for g in dataclasses.fields(sub):
            lines.append(f"| `{f.name}.{g.name}` | `{_cell(_type_name(hints[g.name]))}` | `{_cell(_default(g))}` | "
                         f"{_cell(field_doc(sub, g.name))} |")
        lines.append("")
    if top:
        lines += ["## Run-wide", "", "| key | type | default | description |", "|---|---|---|---|"]
        hints = _hints(cls)
        for f in top:
            lines.append(f"| `{f.name}` | `{_cell(_type_name(hints[f.name]))}` | `{_cell(_default(f))}` | "
                         f"{_cell(field_doc(cls, f.name))} |")
    return "\n".join(lines) + "\n"

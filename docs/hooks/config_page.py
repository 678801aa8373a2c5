"""mkdocs hook: the configuration page, generated at build time from the config dataclasses' field
docstrings (`sae_lens_ctx.core.config_docs.reference_markdown`), so that no field is described twice."""

from mkdocs.structure.files import File

from sae_lens_ctx.core.config_docs import reference_markdown

PAGE = "configuration.md"


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=reference_markdown()))
    return files

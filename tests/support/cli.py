"""Running the CLI in-process and checking its one-line errors."""

from __future__ import annotations

from sae_lens_ctx.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *words):
    lines = [line for line in err.splitlines() if line.startswith("sae-lens-ctx: error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])

"""Reading an offline W&B run back from disk (`wandb leet inspect`): summary, config, tables, artifacts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

# A hang guard, not a timing assertion.
HANG_GUARD_S = 1800


def inspect(run_dir: str, *flags: str):
    proc = subprocess.run(["wandb", "leet", "inspect", *flags, "--json", run_dir], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class Offline:
    """What an offline W&B run left on disk: summary, config, tables, artifacts."""

    def __init__(self, run_dir: str):
        self.dir = Path(run_dir)
        self.records = [json.loads(line) for line in inspect(run_dir).splitlines() if line.strip()]
        overview = json.loads(inspect(run_dir, "--summary"))
        self.summary, self.config = overview["summary"], overview["config"]
        self.tags, self.state = overview.get("tags", []), overview.get("state")
        self.run = next(r["run"] for r in self.records if r["type"] == "run")
        self.artifacts = [r["artifact"] for r in self.records if r["type"] == "artifact"]

    def table(self, key: str) -> dict:
        """The run-file copy of a logged table (`files/<path>`)."""
        return json.loads((self.dir / "files" / self.summary[key]["path"]).read_text(encoding="utf-8"))

    def artifact(self, type_: str, name_prefix: str = "") -> dict:
        found = [a for a in self.artifacts if a["type"] == type_ and a["name"].startswith(name_prefix)]
        assert len(found) == 1, [(a["name"], a["type"]) for a in self.artifacts]
        return found[0]

    @staticmethod
    def files(artifact: dict) -> dict[str, Path]:
        return {c["path"]: Path(c["local_path"]) for c in artifact["manifest"]["contents"]}

"""requests.jsonl (and vanilla_recheck.jsonl): one JSON record per line, appended and flushed as each
request finishes. A kill can cut the last line short; readers drop it and writers repair the tail
before appending."""

from __future__ import annotations

import json
from pathlib import Path

REQUESTS = "requests.jsonl"
COSTS = "costs.json"  # the step cost table measured at warm-up (decoding/cost.py), for predicted speedups
RECHECK = "vanilla_recheck.jsonl"  # vanilla batches measured again at the end of a run (drift check)


def read_records(path: Path) -> list[dict]:
    """Every complete line; a line cut by a kill is dropped (and its request run again)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def repair_tail(path: Path) -> None:
    """Drop a half-written last line left by a kill, so the next append starts on a fresh line."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])

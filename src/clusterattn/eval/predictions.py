"""``predictions.jsonl``: one JSON row per (sample, press, budget), appended as answers come in."""

from __future__ import annotations

import json
from pathlib import Path


def read_predictions(path: Path) -> list[dict]:
    """Rows of ``predictions.jsonl``; a torn last line (an interrupted write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def open_for_append(path: Path):
    """Open ``path`` for appending rows; a torn last line (an interrupted write) is ended first so
    the next row starts on a line of its own."""
    sink = Path(path).open("a+")  # noqa: SIM115  (returned to the caller, closed by its with-block)
    if sink.tell():
        sink.seek(sink.tell() - 1)
        if sink.read(1) != "\n":
            sink.write("\n")
    return sink

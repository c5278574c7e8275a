"""Where the zoo's coverage matrix is committed, and how it is read (the runner is
:mod:`zoo.coverage`; the zoo cases read their ``one_graph`` / ``graph_break`` from here)."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
JSONL = RESULTS / "coverage.jsonl"
MARKDOWN = RESULTS / "coverage.md"
SECTIONS = ("capture", "caching")


def load_results(path: Path = JSONL) -> dict:
    """``{case name: {"name", "class", "capture": ..., "caching": ...}}`` from the JSON lines at
    ``path`` (later lines update earlier ones section by section); empty if there is no file."""
    results: dict = {}
    if not path.exists():
        return results
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        results.setdefault(rec["name"], {}).update(rec)
    return results


def capture_status(path: Path = JSONL) -> dict:
    """``{case name: capture result}`` for the cases whose capture check was recorded."""
    return {name: r["capture"] for name, r in load_results(path).items() if "capture" in r}

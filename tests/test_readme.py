"""The README quotes only what a fresh clone printed: its quick-start blocks are lines
of the committed log of `bash example_configs/run.sh` (docs/quickstart.log)."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _blocks(text: str, start: str, end: str):
    part = text[text.index(start):text.index(end)]
    return re.findall(r"```\n(.*?)```", part, flags=re.S)


def test_quick_start_output_is_the_committed_log():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    log = open(os.path.join(ROOT, "docs", "quickstart.log"), encoding="utf-8").read()
    logged = {line.rstrip() for line in log.splitlines()}
    quoted = _blocks(readme, "## Quick start", "## When to use it")[1:]  # after the commands
    quoted += _blocks(readme, "On the example models (`example_configs/run.sh`", "## Learning")
    lines = [line.rstrip() for block in quoted for line in block.splitlines()]
    lines = [x for x in lines if x and x != "..."]
    assert len(lines) > 10
    missing = [x for x in lines if x not in logged]
    assert not missing, missing


def test_no_document_keeps_an_unfilled_placeholder():
    """A number or paragraph written later is never left as a marker in what users read."""
    paths = [os.path.join(ROOT, "README.md")] + [
        os.path.join(ROOT, "docs", name) for name in sorted(os.listdir(os.path.join(ROOT, "docs")))
        if name.endswith(".md")]
    found = [f"{os.path.relpath(p, ROOT)}:{i}: {line.strip()}"
             for p in paths for i, line in enumerate(open(p, encoding="utf-8"), 1)
             if re.search(r"\b[A-Z][A-Z_]*PLACEHOLDER\b|\bTODO\b|\bTBD\b|\bXXX\b", line)]
    assert not found, found

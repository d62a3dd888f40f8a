"""Shared by the benchmark scripts: rewrite one ``## section`` of a markdown file."""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(doc: Path, title: str, body: str, keep_from: str | None = None) -> None:
    """Replace (or append) the ``## title`` section of ``doc``, leaving the others alone.

    ``keep_from`` (a regex) marks the start of hand-written notes at the end of the old section,
    kept across re-runs."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    old = pattern.search(text)
    notes = old and keep_from and re.search(keep_from + ".*", old.group(0), re.S | re.M)
    if notes:
        section += "\n" + notes.group(0).strip() + "\n"
    if old:
        text = text[: old.start()] + section + "\n" + text[old.end() :]
    else:
        text = text.rstrip() + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip() + "\n")

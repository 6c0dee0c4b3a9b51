"""Write a notebook from a list of (kind, source) cells: kept clean (no outputs, no counts).

Used to (re)generate the study notebooks from their readable cell lists in tools/make_notebooks.py.
"""
from __future__ import annotations

from pathlib import Path

import nbformat


def build(cells: list[tuple[str, str]], path: str | Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    out = []
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            out.append(nbformat.v4.new_markdown_cell(src))
        elif kind in ("code", "params"):
            c = nbformat.v4.new_code_cell(src)
            if kind == "params":
                c.metadata["tags"] = ["parameters"]
            out.append(c)
        else:
            raise ValueError(f"unknown cell kind {kind!r}; allowed: 'md', 'code', 'params'")
    for i, c in enumerate(out):  # stable ids keep diffs small
        c["id"] = f"cell-{i:02d}"
    nb.cells = out
    nbformat.validate(nb)
    Path(path).write_text(nbformat.writes(nb) + "\n")

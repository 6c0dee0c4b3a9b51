"""Regenerate the study notebooks from their cell lists (tools/notebook_cells/nbNN.py).

    python tools/make_notebooks.py            # all
    python tools/make_notebooks.py 01 02      # some

Each module in tools/notebook_cells defines NAME (the notebook's file name) and CELLS, a list
of ("md" | "code" | "params", source) pairs. Notebooks are written without outputs.
"""
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from nbtools import build  # noqa: E402


def main(only: list[str]) -> None:
    for mod_path in sorted((HERE / "notebook_cells").glob("nb*.py")):
        key = mod_path.stem[2:]
        if only and key not in only:
            continue
        spec = importlib.util.spec_from_file_location(mod_path.stem, mod_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        target = HERE.parent / "notebooks" / mod.NAME
        build(mod.CELLS, target)
        print(f"wrote {target.relative_to(HERE.parent)} ({len(mod.CELLS)} cells)")


if __name__ == "__main__":
    main(sys.argv[1:])

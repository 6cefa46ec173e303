"""Execute the walkthrough notebooks in place (with outputs, for GitHub) and refresh the README gallery.

    python notebooks/run.py                      # every notebooks/NN_*.ipynb
    python notebooks/run.py notebooks/02_diffusion.ipynb

Each notebook runs top to bottom in a fresh kernel, in notebooks/ as working directory, as the test
(tests/test_notebooks.py) runs it; the image of the cell tagged "gallery" is written to docs/nbNN.png.
The test fails when a committed notebook's outputs are missing or no longer what running it gives:
run this after changing a notebook or the package code it shows, and commit the notebooks and docs/.
"""
import base64
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
CELL_TIMEOUT = 600  # seconds, per cell


def notebooks() -> list:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def execute(path) -> nbformat.NotebookNode:
    """A copy of the notebook at `path`, executed top to bottom in a fresh python3 kernel."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def gallery_png(nb) -> bytes | None:
    """The PNG shown by the cell tagged "gallery" (its last image), or None."""
    for cell in nb.cells:
        if "gallery" in cell.get("metadata", {}).get("tags", []):
            images = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            return base64.b64decode(images[-1]) if images else None
    return None


def gallery_path(path) -> Path:
    return DOCS / f"nb{Path(path).name[:2]}.png"


def main(paths):
    for path in paths or notebooks():
        t0 = time.time()
        nb = execute(path)
        nbformat.write(nb, path)
        png = gallery_png(nb)
        if png:
            gallery_path(path).write_bytes(png)
        print(f"{Path(path).name}: {time.time() - t0:.0f} s" + (f", {gallery_path(path).name} {len(png) // 1024} KB" if png else ""))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Executes the notebooks in notebooks/ top to bottom; fails on any error.

  python scripts/run_notebooks.py                 # all, small (CI) settings
  python scripts/run_notebooks.py --store         # the same, outputs saved
  python scripts/run_notebooks.py --full notebooks/03_label_noise.ipynb \\
      --output-dir /tmp/executed                  # one, full, keep outputs

Each notebook runs in a fresh ``python3`` Jupyter kernel (ipykernel) with its
working directory set to notebooks/ and ``SAM_OPTAX_QUICK=1`` in the
environment (``0`` with ``--full``), which the notebooks read in their first
code cell.

The notebooks in the repository are stored *with* their outputs (small
settings, PNG plots at 72 dpi), so GitHub and the docs site show the plots:
``--store`` executes them and writes the outputs in place, after stamping the
repository URL (``[project.urls] Source`` in pyproject.toml, the one place to
change it) into the Colab badges and the Colab install cells (``--stamp``
does only that). Without ``--store`` the script executes copies in memory
(what CI does) and also fails if a notebook is not stamped with that URL,
was stored without outputs, or is larger than 1 MB.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile
import time

import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"
MAX_BYTES = 1_000_000  # A stored notebook must stay well under this.


def repo_url() -> str:
  """``[project.urls] Source`` from pyproject.toml (no tomllib on 3.10)."""
  text = (ROOT / "pyproject.toml").read_text()
  match = re.search(r'^Source\s*=\s*"(https://github\.com/[^"]+?)/?"', text,
                    re.M)
  if match is None:
    sys.exit("pyproject.toml: no [project.urls] Source = "
             '"https://github.com/<owner>/<repo>"')
  return match.group(1)


_COLAB = re.compile(r"https://colab\.research\.google\.com/github/"
                    r"[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/notebooks/")
_PIP = re.compile(r"git\+https://github\.com/[^/\s\"']+/[^\s\"'@]+")


def stamp(nb: nbformat.NotebookNode, url: str) -> bool:
  """Points the Colab badge and install cell at ``url``; True if changed."""
  slug = url.removeprefix("https://github.com/")
  changed = False
  for cell in nb.cells:
    new = _COLAB.sub(
        f"https://colab.research.google.com/github/{slug}/blob/main/"
        "notebooks/", cell.source)
    new = _PIP.sub(f"git+{url}", new)
    if new != cell.source:
      cell.source, changed = new, True
  return changed


def has_outputs(nb: nbformat.NotebookNode) -> bool:
  """Every code cell was executed (and stored with its count)."""
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  return bool(code) and all(cell.get("execution_count") for cell in code)


def clear_outputs(nb: nbformat.NotebookNode) -> None:
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None


def check_kernel() -> None:
  try:
    KernelSpecManager().get_kernel_spec(KERNEL)
  except NoSuchKernel:
    sys.exit(f"No Jupyter kernel named {KERNEL!r}: install ipykernel "
             "(`python -m pip install ipykernel`) or register it with "
             "`python -m ipykernel install --user`.")


def run(path: pathlib.Path, timeout: int, output_dir: pathlib.Path | None,
        store: bool = False) -> tuple[bool, float]:
  nb = nbformat.read(path, as_version=4)
  if store:
    stamp(nb, repo_url())
  clear_outputs(nb)
  # record_timing=False: no timestamps in the stored cells, so re-storing
  # an unchanged notebook changes only what its outputs really change.
  client = NotebookClient(
      nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
      resources={"metadata": {"path": str(NOTEBOOKS)}})
  start = time.perf_counter()
  ok = True
  # The kernel's own stdout/stderr (not the cells' outputs, which come back
  # as messages) go to a log, shown only if the notebook fails.
  with tempfile.TemporaryFile("w+") as log:
    try:
      client.execute(stdout=log, stderr=log)
    except (CellExecutionError, CellTimeoutError) as e:
      ok = False
      print(f"FAILED {path.name}:\n{e}", file=sys.stderr)
    except Exception as e:  # A dead kernel, ...: report it, run the others.
      ok = False
      print(f"FAILED {path.name}: {type(e).__name__}: {e}", file=sys.stderr)
    if not ok:
      log.seek(0)
      print(f"kernel log (last 5000 characters):\n{log.read()[-5000:]}",
            file=sys.stderr)
  elapsed = time.perf_counter() - start
  if output_dir is not None:
    output_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, output_dir / path.name)
  if store and ok:
    nbformat.write(nb, path)
  return ok, elapsed


def check_stored(paths: list[pathlib.Path]) -> list[str]:
  """What is wrong with the notebooks as stored (CI checks this)."""
  url, problems = repo_url(), []
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    if stamp(nb, url):
      problems.append(f"{path.name}: Colab badge or install cell not "
                      f"pointing at {url}")
    if not has_outputs(nb):
      problems.append(f"{path.name}: stored without outputs")
    size = path.stat().st_size
    if size > MAX_BYTES:
      problems.append(f"{path.name}: {size / 1e6:.1f} MB stored (limit "
                      f"{MAX_BYTES / 1e6:.0f} MB): smaller plots")
  return problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="*", type=pathlib.Path,
                      help="default: every notebooks/*.ipynb")
  parser.add_argument("--full", action="store_true",
                      help="full settings (SAM_OPTAX_QUICK=0)")
  parser.add_argument("--timeout", type=int, default=None,
                      help="seconds per cell (default 300, 3600 with --full)")
  parser.add_argument("--output-dir", type=pathlib.Path, default=None,
                      help="write the executed notebooks here")
  parser.add_argument("--store", action="store_true",
                      help="stamp the repository URL, execute, and save the "
                      "outputs in place")
  parser.add_argument("--stamp", action="store_true",
                      help="only stamp the repository URL (pyproject.toml) "
                      "into the badges and install cells, then exit")
  parser.add_argument("--clear-outputs", action="store_true",
                      help="strip outputs from the notebooks in place, then "
                      "exit")
  args = parser.parse_args(argv)
  paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
  if not paths:
    print(f"no notebooks in {NOTEBOOKS}", file=sys.stderr)
    return 1

  if args.clear_outputs:
    for path in paths:
      nb = nbformat.read(path, as_version=4)
      clear_outputs(nb)
      nbformat.write(nb, path)
    print(f"cleared {len(paths)} notebooks")
    return 0

  if args.stamp:
    url = repo_url()
    for path in paths:
      nb = nbformat.read(path, as_version=4)
      if stamp(nb, url):
        nbformat.write(nb, path)
    print(f"stamped {url} into {len(paths)} notebooks")
    return 0

  if args.store and args.full:
    parser.error("--store keeps the small settings: outputs stay small")
  if not args.store:
    problems = check_stored(paths)
    if problems:
      print("\n".join(problems) + "\nfix: python scripts/run_notebooks.py "
            "--store", file=sys.stderr)
      return 1

  check_kernel()
  os.environ["SAM_OPTAX_QUICK"] = "0" if args.full else "1"
  timeout = args.timeout or (3600 if args.full else 300)
  failed, total = [], 0.0
  for path in paths:
    ok, elapsed = run(path.resolve(), timeout, args.output_dir, args.store)
    total += elapsed
    print(f"{'ok    ' if ok else 'FAILED'} {path.name} ({elapsed:.1f} s)",
          flush=True)
    if not ok:
      failed.append(path.name)
  print(f"{len(paths) - len(failed)}/{len(paths)} notebooks ran in "
        f"{total:.1f} s")
  if args.store:
    for path in paths:
      print(f"stored {path.name}: {path.stat().st_size / 1e3:.0f} kB")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

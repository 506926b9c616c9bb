"""Executes the notebooks in notebooks/ top to bottom; fails on any error.

  python scripts/run_notebooks.py                 # all, small (CI) settings
  python scripts/run_notebooks.py --full notebooks/03_label_noise.ipynb \\
      --output-dir /tmp/executed                  # one, full, keep outputs

Each notebook runs in a fresh ``python3`` Jupyter kernel (ipykernel) with its
working directory set to notebooks/ and ``SAM_OPTAX_QUICK=1`` in the
environment (``0`` with ``--full``), which the notebooks read in their first
code cell. The notebooks in the repository are kept without outputs: this
script executes copies in memory and writes them only to ``--output-dir``;
it also fails if a notebook was saved with outputs (``--clear-outputs``
strips them in place).
"""

from __future__ import annotations

import argparse
import os
import pathlib
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


def has_outputs(nb: nbformat.NotebookNode) -> bool:
  return any(cell.get("outputs") or cell.get("execution_count")
             for cell in nb.cells if cell.cell_type == "code")


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


def run(path: pathlib.Path, timeout: int, output_dir: pathlib.Path | None
        ) -> tuple[bool, float]:
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
      nb, timeout=timeout, kernel_name=KERNEL,
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
  return ok, elapsed


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

  saved_with_outputs = [p.name for p in paths
                        if has_outputs(nbformat.read(p, as_version=4))]
  if saved_with_outputs:
    print(f"saved with outputs: {', '.join(saved_with_outputs)}; keep them "
          "out of git: python scripts/run_notebooks.py --clear-outputs",
          file=sys.stderr)
    return 1

  check_kernel()
  os.environ["SAM_OPTAX_QUICK"] = "0" if args.full else "1"
  timeout = args.timeout or (3600 if args.full else 300)
  failed, total = [], 0.0
  for path in paths:
    ok, elapsed = run(path.resolve(), timeout, args.output_dir)
    total += elapsed
    print(f"{'ok    ' if ok else 'FAILED'} {path.name} ({elapsed:.1f} s)",
          flush=True)
    if not ok:
      failed.append(path.name)
  print(f"{len(paths) - len(failed)}/{len(paths)} notebooks ran in "
        f"{total:.1f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

"""Runs tests/multidevice (8 fake CPU devices) in its own pytest process."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_multidevice_suite_passes_in_its_own_process():
  env = {**os.environ, "PYTHONHASHSEED": "0"}
  run = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "tests/multidevice"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=1200, check=False)
  summary = run.stdout.strip().splitlines()[-1:] or ["(no output)"]
  print("tests/multidevice:", summary[0])
  assert run.returncode == 0, (run.stdout[-6000:] + run.stderr[-2000:])

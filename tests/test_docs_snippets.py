"""Every ```python block in README.md and docs/*.md runs as written.

The files are found by a glob, so a new page in docs/ is tested without
editing this file. Each block is one test (``README.md:54``) and runs **on its
own**, in a fresh namespace, as a reader who copies it would run it: it must
import what it uses. Markers, HTML comments on the lines right above the
opening fence (invisible on GitHub and on the docs site), say what a block
assumes (docs/contributing.md has the same convention for page authors):

``<!-- prelude: loss_fn params batch -->``
    The block uses these names without defining them (a snippet that shows
    one step of a training loop). The test defines them first, from
    ``PRELUDES`` below: a tiny MLP problem (16 examples, 4 features, 3
    classes). The names are listed in ``PRELUDES``; add one there if a page
    needs it.
``<!-- continue -->``
    The block continues the previous block of the same file: it runs in the
    namespace that block left (pages written as one story, e.g.
    docs/flax.md). A reader runs the blocks in order.
``<!-- skip: reason -->``
    The block cannot run here (e.g. it needs several hosts); it is only
    compiled, so a syntax error still fails. The reason is required and
    should say where the code *is* tested, if it is.

All blocks run in one subprocess with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before JAX
starts), so the ``pmap`` and ``shard_map`` recipes run on 8 devices.
Tracebacks point at the Markdown file's own line numbers. Only ```python
fences run; ```bash, ```text and so on are not Python. Matplotlib uses the
Agg backend; a DeprecationWarning or FutureWarning raised at a line of a
snippet fails it (the docs should not teach deprecated calls).

Also checked: README.md's links are absolute (a package index renders the
README without the repository's files) and point at ``[project.urls]
Source`` in pyproject.toml.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The names a ``<!-- prelude: ... -->`` may ask for, each the code that
# defines it (run in the block's namespace, in the order listed, so a later
# one may use an earlier one). Keep them tiny: the whole test should take
# well under a minute.
_MLP = """\
import jax as _jax
import jax.numpy as _jnp


def _mlp_problem():
  k1, k2, k3 = _jax.random.split(_jax.random.key(0), 3)
  params = {"w1": 0.5 * _jax.random.normal(k1, (4, 8)),
            "b1": _jnp.zeros(8),
            "w2": 0.5 * _jax.random.normal(k2, (8, 3)),
            "b2": _jnp.zeros(3)}
  x = _jax.random.normal(k3, (16, 4))
  y = _jnp.arange(16) % 3
  return params, x, y
"""
PRELUDES: dict[str, str] = {
    # loss_fn(params, batch) with batch = {"x": ..., "y": ...}, or
    # loss_fn(params, x, y): a 4-8-3 MLP, mean cross-entropy. The product-sum
    # (not a matmul) keeps it valid with 'model'-sharded params.
    "loss_fn": _MLP + """
import optax as _optax


def loss_fn(params, batch_or_x, y=None):
  x, y = (batch_or_x["x"], batch_or_x["y"]) if y is None else (batch_or_x, y)
  h = _jnp.tanh(x @ params["w1"] + params["b1"])
  logits = _jnp.sum(h[..., None] * params["w2"], -2) + params["b2"]
  return _optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
""",
    # {"w1": (4, 8), "b1": (8,), "w2": (8, 3), "b2": (3,)}, float32.
    "params": _MLP + "params = _mlp_problem()[0]\n",
    # {"x": (16, 4) float32, "y": (16,) int32}.
    "batch": _MLP + "batch = dict(zip(('x', 'y'), _mlp_problem()[1:]))\n",
    "x": _MLP + "x = _mlp_problem()[1]\n",
    "y": _MLP + "y = _mlp_problem()[2]\n",
    "x_train": _MLP + "x_train = _mlp_problem()[1]\n",
    "y_train": _MLP + "y_train = _mlp_problem()[2]\n",
    # sam with axis_name="data" (the multi-device pages).
    "tx": """\
import optax as _optax
import sam_optax as _sam_optax
tx = _sam_optax.sam(_optax.sgd(0.1, momentum=0.9), rho=0.05,
                    axis_name="data")
""",
    # docs/multihost.md's train_step body (params, opt_state, x, y), for tx
    # and loss_fn above.
    "step_body": """\
import jax as _jax
import optax as _optax
import sam_optax as _sam_optax


def step_body(params, opt_state, x, y):
  local = _sam_optax.mark_varying(params, "data")
  grads = _jax.grad(loss_fn)(local, x, y)
  updates, opt_state = tx.update(
      grads, opt_state, params,
      grad_fn=lambda p: _jax.grad(loss_fn)(p, x, y))
  return _optax.apply_updates(params, updates), opt_state
""",
}

# A fence: 3+ backticks or tildes; it is closed by a run of the same
# character at least as long (CommonMark), so a ````markdown example may hold
# a ```python fence that is not run.
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})"
                    r"(?P<lang>[^\s`]*)[^`]*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>[a-z]+)\s*(?::(?P<arg>.*?))?\s*-->"
                     r"\s*$")


@dataclasses.dataclass
class Block:
  path: str       # relative to the repository root
  line: int       # 1-based line of the first code line
  code: str
  prelude: list[str]
  skip: str | None
  cont: bool
  error: str | None = None  # a malformed marker

  @property
  def id(self) -> str:
    return f"{self.path}:{self.line}"


def extract(path: pathlib.Path) -> list[Block]:
  """The ```python blocks of a Markdown file, with their markers."""
  lines = path.read_text().splitlines()
  rel = path.relative_to(ROOT).as_posix()
  blocks, i = [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if m is None:
      i += 1
      continue
    fence, lang = m.group("fence"), m.group("lang")
    j = i + 1
    while j < len(lines) and not (
        lines[j].strip().startswith(fence) and
        set(lines[j].strip()) == {fence[0]}):
      j += 1
    if lang == "python":
      block = Block(rel, i + 2, textwrap.dedent("\n".join(lines[i + 1:j])),
                    [], None, False)
      k = i - 1
      while k >= 0 and _MARKER.match(lines[k]):
        mk = _MARKER.match(lines[k])
        kind, arg = mk.group("kind"), (mk.group("arg") or "").strip()
        if kind == "prelude":
          names = arg.replace(",", " ").split()
          unknown = [n for n in names if n not in PRELUDES]
          if unknown or not names:
            block.error = (f"prelude {unknown or names} not in PRELUDES "
                           f"(known: {', '.join(PRELUDES)})")
          block.prelude = names + block.prelude
        elif kind == "skip":
          block.skip = arg
          if not arg:
            block.error = "<!-- skip: ... --> needs a reason"
        elif kind == "continue":
          block.cont = True
        else:
          block.error = f"unknown marker <!-- {kind} -->"
        k -= 1
      blocks.append(block)
    i = j + 1
  return blocks


BLOCKS = [b for f in FILES for b in extract(f)]


# ------------------------------------------------------------------ runner
# `python tests/test_docs_snippets.py FILE...` runs the blocks and prints one
# JSON object per block; the tests below start it once, in a subprocess.


def _run_blocks(paths: list[str]) -> None:
  import time
  import traceback
  import warnings

  warnings.filterwarnings("error", category=DeprecationWarning,
                          module="__snippet__")
  warnings.filterwarnings("error", category=FutureWarning,
                          module="__snippet__")
  for rel in paths:
    previous: dict | None = None
    for block in extract(ROOT / rel):
      start = time.perf_counter()
      result = {"id": block.id, "ok": True, "skipped": False, "error": ""}
      source = "\n" * (block.line - 1) + block.code  # Markdown line numbers.
      try:
        code = compile(source, block.path, "exec")
        if block.skip is not None:
          result["skipped"] = True
        else:
          ns = previous if (block.cont and previous is not None) else {
              "__name__": "__snippet__"}
          for name in block.prelude:
            exec(compile(PRELUDES[name], f"<prelude {name}>", "exec"), ns)
          exec(code, ns)
          previous = ns
      except BaseException:  # noqa: BLE001  Report it, run the others.
        result["ok"] = False
        tb = traceback.format_exc().splitlines()
        result["error"] = "\n".join(tb[-40:])
        previous = None
      result["seconds"] = round(time.perf_counter() - start, 2)
      print("SNIPPET " + json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
  env = dict(os.environ)
  # 8 fake devices; and a cheaper XLA compile (the snippets are tiny and run
  # once: compiling dominates, and these halve it).
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8"
                      " --xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["MPLBACKEND"] = "Agg"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
  files = [f.relative_to(ROOT).as_posix() for f in FILES]
  proc = subprocess.run(
      [sys.executable, __file__, *files], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=600, check=False)
  out = {}
  for line in proc.stdout.splitlines():
    if line.startswith("SNIPPET "):
      r = json.loads(line[len("SNIPPET "):])
      out[r["id"]] = r
  if not out:
    pytest.fail(f"snippet runner failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-5000:]}")
  out["__stderr__"] = {"text": proc.stderr}
  return out


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_snippet_runs(block: Block, results: dict[str, dict]) -> None:
  assert block.error is None, f"{block.id}: {block.error}"
  r = results.get(block.id)
  if r is None:
    pytest.fail(f"{block.id}: no result; runner stderr:\n"
                f"{results['__stderr__']['text'][-3000:]}")
  if not r["ok"]:
    pytest.fail(f"{block.id} fails as written:\n{r['error']}\n\nA block runs "
                "on its own, as a reader would copy it: it imports what it "
                "uses. Names it assumes: <!-- prelude: loss_fn params batch "
                "-->; continuing the previous block: <!-- continue -->; "
                "cannot run here: <!-- skip: reason --> (docs/contributing.md)",
                pytrace=False)
  if r["skipped"]:
    pytest.skip(f"{block.id}: {block.skip} (compiled only)")


def test_docs_have_snippets() -> None:
  assert len(BLOCKS) > 10, [f.name for f in FILES]


def _repo_url() -> str:
  text = (ROOT / "pyproject.toml").read_text()
  return re.search(r'^Source\s*=\s*"([^"]+?)/?"', text, re.M).group(1)


def test_readme_links_absolute() -> None:
  """A package index shows README.md without the repository's files."""
  text = (ROOT / "README.md").read_text()
  url = _repo_url()
  bad = []
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if target.startswith("#"):
      continue
    if not re.match(r"https?://", target):
      bad.append(f"{target}: relative")
    elif "github.com" in target and "sam_optax" in target and \
        not target.startswith(url):
      bad.append(f"{target}: not under {url}")
  assert not bad, "README.md links:\n" + "\n".join(bad)


if __name__ == "__main__":
  _run_blocks(sys.argv[1:])

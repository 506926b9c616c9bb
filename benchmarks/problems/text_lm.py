"""``text-lm``: a byte-level decoder-only transformer on Python's own docs.

Corpus: the topic help texts that ship with Python (``pydoc_data.topics``,
the text behind ``help('FOR')``...; about 465 KB of English with code
samples), the topics in sorted order, UTF-8 bytes. Fixed contiguous splits:
the first 90% train, the next 5% validation, the last 5% test, each cut into
non-overlapping windows of 65 bytes (64 inputs, 64 next-byte targets).

Model: byte embedding and learned positions (d = 48), 2 pre-LayerNorm blocks
of causal multi-head self-attention (4 heads) and a 4x GELU MLP, a final
LayerNorm and a byte classifier (about 85k parameters). Base optimizer:
AdamW (weight decay 0.01), learning rate 3e-3 with linear warm-up over the
first 10% of the steps and cosine decay to 0; batch 16 windows, 400 steps
(quick: 40 steps). Metric: test bits per byte (lower is better).

Robustness axes (measured on the test split at the evaluation parameters):

* ``bpb_int8`` / ``bpb_int4``: after round-to-nearest symmetric weight
  quantization of every weight matrix and embedding (one scale per output
  column: ``max |w|`` over the input axis / 127 or / 7), biases and
  LayerNorm scales kept in float32;
* ``bpb_after_finetune`` and ``forgetting`` (its increase over ``bpb``):
  after a short fine-tune on a different corpus (Python source of a few
  standard-library modules: 40 AdamW steps at a constant 1e-3, batch 16),
  the same fine-tune for every method.

Windows have no stable example identity a per-example store would need, so
SAF does not apply here (its store would hold 64 x 256 outputs per window).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ._base import Data, Problem, grids

VOCAB = 256
SEQ = 64
FINETUNE_MODULES = ("argparse", "textwrap", "string", "shlex", "pprint")
FINETUNE_BYTES = 96_000
FINETUNE_STEPS = 40
FINETUNE_LR = 1e-3


def _windows(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  a = np.frombuffer(data, np.uint8).astype(np.int32)
  n = (len(a) - 1) // SEQ
  chunks = np.stack([a[i * SEQ:i * SEQ + SEQ + 1] for i in range(n)])
  return chunks[:, :-1], chunks[:, 1:]


def corpus() -> bytes:
  import pydoc_data.topics as t

  return "\n\n".join(t.topics[k] for k in sorted(t.topics)).encode("utf-8")


def finetune_corpus() -> bytes:
  import importlib

  parts = [inspect.getsource(importlib.import_module(m))
           for m in FINETUNE_MODULES]
  return "\n\n".join(parts).encode("utf-8")[:FINETUNE_BYTES]


@functools.cache
def load(quick: bool = False) -> Data:
  del quick
  text = corpus()
  n = len(text)
  a, b = int(0.9 * n), int(0.95 * n)
  x_train, y_train = _windows(text[:a])
  x_val, y_val = _windows(text[a:b])
  x_test, y_test = _windows(text[b:])
  x_ft, y_ft = _windows(finetune_corpus())
  return Data(x_train, y_train, x_val, y_val, x_test, y_test,
              extra={"x_ft": x_ft, "y_ft": y_ft})


class Block(nnx.Module):
  """Pre-LN causal self-attention and MLP, both residual."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k,
                                                                     v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, -1e9)
    h = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
    x = x + self.out(h.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class ByteLM(nnx.Module):
  """Embedding, learned positions, blocks, final LN, byte logits."""

  def __init__(self, dim: int = 48, heads: int = 4, layers: int = 2, *,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, dim)))
    self.blocks = nnx.List([Block(dim, heads, rngs=rngs)
                            for _ in range(layers)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


def model(seed: int = 0, quick: bool = False) -> ByteLM:
  del quick
  return ByteLM(rngs=nnx.Rngs(seed))


def base(total_steps: int, quick: bool = False):
  del quick
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 3e-3, max(1, total_steps // 10), total_steps)
  return optax.adamw(schedule, weight_decay=0.01)


def example_loss(logits, y):
  """Per-window mean next-byte cross-entropy (nats)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(-1)


def bits_per_byte(logits, y):
  return example_loss(logits, y) / math.log(2.0)


def train_targets(data: Data, setting: str, seed: int) -> np.ndarray:
  if setting != "clean":
    raise ValueError(f"text-lm has one setting, 'clean'; got {setting!r}")
  del seed
  return data.y_train


def quantize(params, bits: int):
  """Round-to-nearest symmetric quantization of every matrix, per column."""
  qmax = 2.0 ** (bits - 1) - 1

  def q(w):
    if w.ndim < 2:
      return w
    scale = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)),
                    keepdims=True) / qmax
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(w / scale), -qmax, qmax) * scale

  return jax.tree.map(q, params)


def extra_metrics(ctx):
  from .train import split_metric

  def test_bpb(params):
    return split_metric(ctx.problem, ctx.f, params, ctx.rest,
                        ctx.arrays["x_test"], ctx.arrays["y_test"])

  out = {"bpb_int8": test_bpb(quantize(ctx.params, 8)),
         "bpb_int4": test_bpb(quantize(ctx.params, 4))}
  tx = optax.adamw(FINETUNE_LR, weight_decay=0.01)
  x_ft, y_ft = ctx.arrays["x_ft"], ctx.arrays["y_ft"]
  idx = jax.random.randint(ctx.key, (FINETUNE_STEPS, 16), 0, x_ft.shape[0])

  def step(carry, i):
    params, state = carry

    def loss(p):
      out, _ = ctx.f.apply(p, ctx.rest, x_ft[i], True)
      return example_loss(out, y_ft[i]).mean()

    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (tuned, _), _ = jax.lax.scan(step, (ctx.params, tx.init(ctx.params)), idx)
  after = test_bpb(tuned)
  out["bpb_after_finetune"] = after
  out["forgetting"] = after - test_bpb(ctx.params)
  return out


PROBLEM = Problem(
    name="text-lm",
    description="byte-level transformer (2 layers, d 48, causal) on "
    "pydoc_data.topics, batch 16 x 64 bytes, AdamW warm-up + cosine, 400 "
    "steps; test bits per byte, after int8/int4 RTN and after a fine-tune",
    load=load, model=model, example_loss=example_loss,
    metric="bits per byte", higher_is_better=False, evaluate=bits_per_byte,
    base=base, batch_size=16, epochs=1, quick_epochs=1, steps=400,
    quick_steps=40,
    settings=("clean",), quick_settings=("clean",),
    train_targets=train_targets, example_ids=False, num_outputs=VOCAB,
    extra_metrics=extra_metrics, eval_chunk=512,
    grids=grids(sam=(0.01, 0.05), asam=(0.1, 0.5), msam=(0.1, 0.3),
                rwp=(0.002, 0.005), lam=(0.3, 1.0)),
)

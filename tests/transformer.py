"""A tiny decoder-only transformer in plain JAX, for tests and benchmarks.

Float32 master params, bf16 compute (the params are cast inside the
forward pass; matrix products accumulate in float32), float32 logits.
:func:`param_specs` shards it FSDP-style over one mesh axis and
tensor-parallel over another (Megatron layout: the attention heads and the
MLP's hidden units over ``tp``, the other dimension of every matrix over
``fsdp``). Used by ``tests/multidevice/test_transformer_sharding.py``,
``benchmarks/lm_memory.py`` and ``docs/language_models.md``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 32
  seq: int = 8
  dim: int = 16
  heads: int = 2
  hidden: int = 32
  layers: int = 2
  compute_dtype: str = "bfloat16"


def init_params(config: Config, seed: int = 0) -> dict:
  """Float32 params: embeddings, ``layers`` blocks, final norm, unembed."""
  rng = np.random.default_rng(seed)
  d, h, v = config.dim, config.hidden, config.vocab

  def dense(fan_in, fan_out):
    return jnp.asarray(rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in),
                       jnp.float32)

  blocks = [{
      "ln1": jnp.ones(d, jnp.float32), "wq": dense(d, d), "wk": dense(d, d),
      "wv": dense(d, d), "wo": dense(d, d), "ln2": jnp.ones(d, jnp.float32),
      "w1": dense(d, h), "w2": dense(h, d)} for _ in range(config.layers)]
  return {
      "embed": jnp.asarray(rng.normal(size=(v, d)), jnp.float32),
      "pos": jnp.asarray(0.1 * rng.normal(size=(config.seq, d)),
                         jnp.float32),
      "blocks": blocks, "ln_f": jnp.ones(d, jnp.float32),
      "unembed": dense(d, v)}


def param_specs(config: Config, fsdp: str | None = "fsdp",
                tp: str | None = "tp") -> dict:
  """``PartitionSpec``s: FSDP over ``fsdp``, tensor parallel over ``tp``."""
  block = {"ln1": P(), "wq": P(fsdp, tp), "wk": P(fsdp, tp),
           "wv": P(fsdp, tp), "wo": P(tp, fsdp), "ln2": P(),
           "w1": P(fsdp, tp), "w2": P(tp, fsdp)}
  return {"embed": P(None, fsdp), "pos": P(), "blocks": [
      dict(block) for _ in range(config.layers)], "ln_f": P(),
          "unembed": P(fsdp, tp)}


def _norm(x, scale):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6)
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def _dot(x, w):
  return jnp.einsum("...i,ij->...j", x, w,
                    preferred_element_type=jnp.float32).astype(x.dtype)


def logits_fn(config: Config, params: dict, tokens: jax.Array) -> jax.Array:
  """``(batch, seq)`` int tokens -> ``(batch, seq, vocab)`` float32 logits."""
  dtype = jnp.dtype(config.compute_dtype)
  p = jax.tree.map(lambda x: x.astype(dtype), params)
  x = p["embed"][tokens] + p["pos"][None, : tokens.shape[1]]
  b, t, d = x.shape
  dh = d // config.heads
  mask = jnp.tril(jnp.ones((t, t), bool))
  for blk in p["blocks"]:
    y = _norm(x, blk["ln1"])
    q, k, v = (_dot(y, blk[n]).reshape(b, t, config.heads, dh)
               for n in ("wq", "wk", "wv"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                   preferred_element_type=jnp.float32) / np.sqrt(dh)
    a = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1).astype(dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, v,
                   preferred_element_type=jnp.float32).astype(dtype)
    x = x + _dot(o.reshape(b, t, d), blk["wo"])
    y = _norm(x, blk["ln2"])
    x = x + _dot(jax.nn.gelu(_dot(y, blk["w1"])), blk["w2"])
  x = _norm(x, p["ln_f"])
  return jnp.einsum("btd,dv->btv", x, p["unembed"],
                    preferred_element_type=jnp.float32)


def loss_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (float32)."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def loss_fn(config: Config, params: dict, batch: dict) -> jax.Array:
  return loss_from_logits(logits_fn(config, params, batch["tokens"]),
                          batch["targets"])


def make_batches(config: Config, num: int, batch_size: int,
                 seed: int = 1) -> list[dict]:
  """``num`` batches of a learnable sequence task (next token = previous
  token + a per-sequence stride, mod vocab)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    start = rng.integers(0, config.vocab, (batch_size, 1))
    stride = rng.integers(1, 4, (batch_size, 1))
    seq = (start + stride * np.arange(config.seq + 1)) % config.vocab
    out.append({"tokens": jnp.asarray(seq[:, :-1], jnp.int32),
                "targets": jnp.asarray(seq[:, 1:], jnp.int32)})
  return out

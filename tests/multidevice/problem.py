"""The small data-parallel problem the variant tests share, and its numpy
reference helpers (float64 vectors over the params' sorted leaves)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

N_DEV, PER_DEV = 8, 4
MESH = Mesh(np.array(jax.devices()), ("batch",))


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": (0.7 * rng.standard_normal((3, 4))).astype(np.float32),
          "b1": (0.1 * rng.standard_normal(4)).astype(np.float32),
          "w2": (0.7 * rng.standard_normal(4)).astype(np.float32)}


def make_data(seed=1, zero_shards=()):
  """Shards whose targets differ, so the local gradients differ clearly."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((N_DEV, PER_DEV, 3)).astype(np.float32)
  y = (np.sin(2.0 * x[..., 0]) * np.cos(np.arange(N_DEV))[:, None]
       + np.linspace(-1.5, 1.5, N_DEV)[:, None]).astype(np.float32)
  m = np.ones((N_DEV, PER_DEV), np.float32)
  m[list(zero_shards)] = 0.0  # Weight 0: zero loss and gradient there.
  return x, y, m


def loss_fn(params, x, y, m):
  pred = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
  return jnp.sum(m * (pred - y) ** 2) / y.shape[0]


PARAMS = init_params()
DATA = make_data()
_grad = jax.jit(jax.grad(loss_fn))


def vec(tree):
  return np.concatenate([np.asarray(tree[k], np.float64).ravel()
                         for k in sorted(tree)])


def unvec(v):
  out, i = {}, 0
  for k in sorted(PARAMS):
    n = PARAMS[k].size
    out[k] = v[i:i + n].reshape(PARAMS[k].shape)
    i += n
  return out


def shard_grad(w, i, data):
  """∇L_i at the float32 rounding of the float64 vector ``w``."""
  x, y, m = data
  p = jax.tree.map(lambda a: a.astype(np.float32), unvec(w))
  return vec(_grad(p, x[i], y[i], m[i]))


def unit(v):
  n = np.linalg.norm(v)
  return v / n if n > 0 else v

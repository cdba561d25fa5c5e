"""In-process A/B: MXFP4 decode + matmul, interleaved nibbles vs two half-width matmuls.

PYTHONPATH=. python benchmarks/mxfp4_decode_ab.py
"interleave" decodes [E, O, D] as kernels/mxfp4.py does (low/high nibbles stacked into even/odd
columns) then one matmul; "split" decodes the low and high nibbles into two [E, O, D/32, 16]
tensors (same bits, no interleave) and multiplies them by the even and odd input columns.
Shapes: 4 selected experts of gpt-oss-20b's mlp1 (O 5760, D 2880), batch 1.
"""
import time, jax, jax.numpy as jnp, numpy as np
from nanogptoss_jax.kernels import mxfp4 as k
rng = np.random.default_rng(0)
E, O, G = 4, 5760, 90
blocks = jnp.asarray(rng.integers(0, 256, (E, O, G, 16), np.uint8))
scales = jnp.asarray(rng.integers(118, 125, (E, O, G), np.uint8))
x = jnp.asarray(rng.standard_normal((1, G * 32), np.float32))
def split_decode(blocks, scales):
  # low and high nibbles as two half-width tensors [E, O, G, 16] each, no interleave
  out = []
  for codes in (blocks & 0x0F, blocks >> 4):
    codes = codes.astype(jnp.uint32)
    mag = codes & 7
    expo = (scales.astype(jnp.uint32) - 1)[..., None] << 23
    bits = jnp.where(mag >= 2, mag << 22, 0) + jnp.where(mag > 0, expo, 0)
    bits = bits | ((codes & 8) << 28)
    out.append(jax.lax.bitcast_convert_type(bits, jnp.float32))
  return out
@jax.jit
def a(blocks, scales, x):
  w = k.decode(blocks, scales)  # [E, O, G*32]
  return jnp.einsum("bi,eoi->beo", x, w)
@jax.jit
def b(blocks, scales, x):
  lo, hi = split_decode(blocks, scales)
  xg = x.reshape(x.shape[0], G, 16, 2)
  return jnp.einsum("bgk,eogk->beo", xg[..., 0], lo) + jnp.einsum("bgk,eogk->beo", xg[..., 1], hi)
ra, rb = np.asarray(a(blocks, scales, x)), np.asarray(b(blocks, scales, x))
print("max rel diff", np.abs(ra - rb).max() / np.abs(ra).max())
lo, hi = jax.jit(split_decode)(blocks, scales)
full = np.asarray(k.decode(blocks, scales)).reshape(E, O, G, 16, 2)
same = [np.array_equal(np.asarray(h).view(np.uint32), full[..., i].view(np.uint32))
        for i, h in enumerate((lo, hi))]
print("decode bit-exact", all(same))
for name, f in (("interleave", a), ("split", b)) * 2:
  ts = []
  for _ in range(5):
    t = time.perf_counter()
    f(blocks, scales, x).block_until_ready()
    ts.append(time.perf_counter() - t)
  n = E * O * G * 32
  print(name, f"{np.median(ts)*1e3:.0f} ms, {n / np.median(ts) / 1e9:.2f} G values/s")

"""Speed of the custom-VJP linear sampler against autodiff of ``map_coordinates`` (same run).

    .venv/bin/python benchmarks/spatial_speed.py [--shape 48,60,48] [--repeats 5]

Measures, on one velocity field: scaling and squaring (7 steps) forward and
forward+backward, and a 12-channel feature warp with the gradient to the
coordinates only (what instance optimisation does), each with
``jaxreg.spatial.sample`` and with ``jax.scipy.ndimage.map_coordinates``.
Writes ``benchmarks/results/spatial_speed.json`` and prints ratios
(reference / jaxreg; > 1 means jaxreg is faster).
"""
import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from jaxreg.spatial import identity_grid, sample


def _mapc(image, coords):
    cs = [coords[..., i] for i in range(coords.shape[-1])]
    return jax.vmap(lambda ch: map_coordinates(ch, cs, order=1, mode="nearest"), in_axes=-1, out_axes=-1)(image)


def _ours(image, coords):
    return sample(image, coords, padding="border")


def _integrate(v, sampler, steps=7):
    grid = identity_grid(v.shape[:-1])
    return jax.lax.fori_loop(0, steps, lambda _, u: u + sampler(u, grid + u), v / 2**steps)


def _time(fn, *args, repeats):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="48,60,48")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "spatial_speed.json"))
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    v = 2.0 * jax.random.normal(jax.random.key(0), shape + (len(shape),))
    feats = jax.random.uniform(jax.random.key(1), shape + (12,))
    fixed = jax.random.uniform(jax.random.key(2), shape + (12,))
    grid = identity_grid(shape)
    rows = {}
    for name, sampler in (("map_coordinates", _mapc), ("jaxreg", _ours)):
        rows[name] = {
            "ss_forward_s": _time(lambda v: _integrate(v, sampler), v, repeats=args.repeats),
            "ss_forward_backward_s": _time(jax.grad(lambda v: jnp.sum(jnp.sin(_integrate(v, sampler)))), v,
                                           repeats=args.repeats),
            "feature_warp_grad_coords_s": _time(
                jax.grad(lambda d: jnp.mean((fixed - sampler(feats, grid + d)) ** 2)), 0.3 * v, repeats=args.repeats),
        }
    ratios = {k: rows["map_coordinates"][k] / rows["jaxreg"][k] for k in rows["jaxreg"]}
    result = {"shape": shape, "repeats": args.repeats, "jax": jax.__version__, "machine": platform.processor(),
              "median_seconds": rows, "speedup_vs_map_coordinates": ratios}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    for k, r in ratios.items():
        print(f"{k}: map_coordinates {rows['map_coordinates'][k]:.3f} s, jaxreg {rows['jaxreg'][k]:.3f} s, "
              f"speed-up {r:.2f}x")


if __name__ == "__main__":
    main()

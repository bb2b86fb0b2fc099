#!/usr/bin/env python
"""Train-step and scaling-and-squaring speed/memory: jaxreg (JAX/Flax) vs an equivalent PyTorch model.

Both sides build the same VoxelMorph-style network (encoder 16-32-32-32, decoder
32-32-32-32, final 32-16-16, 3x3x3 convs, LeakyReLU 0.2, max pooling,
nearest upsampling, skip concatenation; flow conv -> SVF integrated by 7
scaling-and-squaring steps at half resolution, linear resampling; loss = MSE
of the warped moving image + diffusion of the displacement; Adam) and time
one training step (forward + backward + update) on random images, batch 1.
A second measurement times scaling and squaring alone (7 steps, forward +
backward of a scalar of the result) on a half-resolution 2 mm field.

Each measurement runs in its own subprocess (fresh compile caches; peak
memory = the process's peak resident set size, ``ru_maxrss``), with the same
thread count on both sides (``--threads``, default 2: XLA via
``--xla_cpu_multi_thread_eigen`` / taskset, PyTorch via
``torch.set_num_threads``). Times are medians over ``--steps`` steps after
``--warmup`` untimed ones (JAX compiles in the first).

Usage::

    .venv/bin/pip install torch==2.13.0   # CPU wheel; not a jaxreg dependency
    .venv/bin/python benchmarks/train_step.py --out benchmarks/results

Writes ``<out>/train_step.json`` and ``<out>/train_step.md``.
"""
import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"2mm": (96, 112, 96), "1mm_crop": (160, 192, 160)}
SS_SHAPE = (48, 56, 48)
ENC, DEC, FINAL = (16, 32, 32, 32), (32, 32, 32, 32), (32, 16, 16)


# ----------------------------------------------------------------------------- workers

def _timed(fn, steps, warmup):
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], times


def jax_worker(what, shape, steps, warmup):
    sys.path.insert(0, str(REPO))
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxreg.methods import voxelmorph as V
    from jaxreg.spatial import integrate

    key = jax.random.key(0)
    if what == "ss":
        v = jax.image.resize(jax.random.normal(key, (6, 7, 6, 3)) * 2.0, (*shape, 3), "cubic")
        w = jax.random.normal(jax.random.key(1), (*shape, 3))
        f = jax.jit(jax.grad(lambda v: jnp.sum(integrate(v, steps=7) * w)))
        t, ts = _timed(lambda: jax.block_until_ready(f(v)), steps, warmup)
        return t, ts
    cfg = V.Config(ndim=3, similarity="mse", reg_weight=1.0, enc_features=ENC, dec_features=DEC,
                   final_features=FINAL, int_steps=7, int_downsize=2)
    graphdef, params = nnx.split(V.init(key, cfg))
    tx = optax.adam(1e-4)
    state = (params, tx.init(params))
    fixed = jax.random.uniform(jax.random.key(1), (1, *shape, 1))
    batch = {"fixed": fixed, "moving": jnp.roll(fixed, 3, axis=1)}

    @jax.jit
    def step(state, batch):
        params, opt = state
        loss, g = jax.value_and_grad(lambda p: V.loss_fn(nnx.merge(graphdef, p), batch, key=key)[0])(params)
        upd, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, upd), opt), loss

    step = jax.jit(step.__wrapped__ if hasattr(step, "__wrapped__") else step, donate_argnums=0)
    holder = [state]

    def run():
        holder[0], loss = step(holder[0], batch)
        jax.block_until_ready(loss)

    return _timed(run, steps, warmup)


def torch_worker(what, shape, steps, warmup, threads):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def grid(shape):
        vecs = [torch.arange(s, dtype=torch.float32) for s in shape]
        return torch.stack(torch.meshgrid(*vecs, indexing="ij"))[None]  # (1, 3, *shape)

    class Transformer(nn.Module):  # voxelmorph.torch.layers.SpatialTransformer
        def __init__(self, shape):
            super().__init__()
            self.shape = shape
            self.register_buffer("grid", grid(shape), persistent=False)

        def forward(self, src, flow):
            loc = self.grid + flow
            loc = torch.stack([2 * (loc[:, i] / (s - 1) - 0.5) for i, s in enumerate(self.shape)], 1)
            loc = loc.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
            return F.grid_sample(src, loc, align_corners=True, mode="bilinear")

    class VecInt(nn.Module):
        def __init__(self, shape, steps=7):
            super().__init__()
            self.t, self.steps = Transformer(shape), steps

        def forward(self, v):
            v = v / 2 ** self.steps
            for _ in range(self.steps):
                v = v + self.t(v, v)
            return v

    if what == "ss":
        v = F.interpolate(torch.randn(1, 3, 6, 7, 6) * 2.0, size=shape, mode="trilinear", align_corners=False)
        v.requires_grad_(True)
        w = torch.randn(1, 3, *shape)
        integ = VecInt(shape)

        def run():
            v.grad = None
            (integ(v) * w).sum().backward()

        return _timed(run, steps, warmup)

    class Block(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = nn.Conv3d(cin, cout, 3, padding=1)

        def forward(self, x):
            return F.leaky_relu(self.conv(x), 0.2)

    class Net(nn.Module):
        def __init__(self, shape):
            super().__init__()
            c, enc = 2, []
            for f in ENC:
                enc.append(Block(c, f))
                c = f
            dec = []
            for f, skip in zip(DEC, reversed(ENC)):
                dec.append(Block(c, f))
                c = f + skip
            fin = []
            for f in FINAL:
                fin.append(Block(c, f))
                c = f
            self.enc, self.dec, self.fin = nn.ModuleList(enc), nn.ModuleList(dec), nn.ModuleList(fin)
            self.flow = nn.Conv3d(c, 3, 3, padding=1)
            nn.init.normal_(self.flow.weight, 0, 1e-5)
            nn.init.zeros_(self.flow.bias)
            half = tuple(s // 2 for s in shape)
            self.integ, self.warp = VecInt(half), Transformer(shape)

        def forward(self, moving, fixed):
            x = torch.cat([moving, fixed], 1)
            skips = []
            for b in self.enc:
                x = b(x)
                skips.append(x)
                x = F.max_pool3d(x, 2)
            for b in self.dec:
                x = b(x)
                s = skips.pop()
                x = torch.cat([F.interpolate(x, size=s.shape[2:], mode="nearest"), s], 1)
            for b in self.fin:
                x = b(x)
            v = self.flow(x)
            vh = F.interpolate(v, scale_factor=0.5, mode="trilinear", align_corners=True) * 0.5
            disp = F.interpolate(self.integ(vh), scale_factor=2, mode="trilinear", align_corners=True) * 2
            return self.warp(moving, disp), disp

    net = Net(shape)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    fixed = torch.rand(1, 1, *shape)
    moving = torch.roll(fixed, 3, dims=2)

    def run():
        opt.zero_grad()
        warped, disp = net(moving, fixed)
        reg = sum(((disp.diff(dim=d)) ** 2).mean() for d in (2, 3, 4))
        loss = F.mse_loss(warped, fixed) + reg
        loss.backward()
        opt.step()

    return _timed(run, steps, warmup)


# ----------------------------------------------------------------------------- driver

def run_worker(args):
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.worker == "jax":
        median, times = jax_worker(args.what, shape, args.steps, args.warmup)
    else:
        median, times = torch_worker(args.what, shape, args.steps, args.warmup, args.threads)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps({"median_s": median, "times_s": times, "peak_rss_mib": peak_mib}), flush=True)


def launch(framework, what, shape, args):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "")
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    cmd = ["taskset", "-c", ",".join(map(str, cpus)), sys.executable, __file__, "--worker", framework, "--what", what,
           "--shape", ",".join(map(str, shape)), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:  # e.g. killed for memory: record it instead of losing the other rows
        print(out.stderr[-2000:], file=sys.stderr)
        return {"median_s": None, "times_s": [], "peak_rss_mib": None, "failed": f"exit {out.returncode}",
                "process_s": time.perf_counter() - t0}
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    res["process_s"] = time.perf_counter() - t0
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="2mm,1mm_crop")
    p.add_argument("--worker", choices=["jax", "torch"])
    p.add_argument("--what", default="train", choices=["train", "ss"])
    p.add_argument("--shape")
    args = p.parse_args()
    if args.worker:
        return run_worker(args)
    import jax
    import torch

    rows = []
    cases = [("train", n, SHAPES[n]) for n in args.sizes.split(",")] + [("ss", "ss_half_2mm", SS_SHAPE)]
    for what, name, shape in cases:
        r = {"case": name, "what": what, "shape": list(shape)}
        for fw in ("jax", "torch"):
            res = launch(fw, what, shape, args)
            r[fw] = res
            print(f"{name} {fw}: {res}", flush=True)
        ok = r["jax"]["median_s"] is not None and r["torch"]["median_s"] is not None
        r["time_ratio_jax_over_torch"] = r["jax"]["median_s"] / r["torch"]["median_s"] if ok else None
        r["memory_ratio_jax_over_torch"] = r["jax"]["peak_rss_mib"] / r["torch"]["peak_rss_mib"] if ok else None
        rows.append(r)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": args.threads, "steps": args.steps,
            "warmup": args.warmup, "cpu_count": os.cpu_count(),
            "command": " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO))
                                 else sys.executable, os.path.relpath(__file__, REPO), *sys.argv[1:]])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = ["# Train step and scaling and squaring: jaxreg (JAX) vs PyTorch (`benchmarks/train_step.py`)", "",
          f"- {meta['date']}; jax {meta['jax']}, torch {meta['torch']}, {args.threads} threads each, "
          f"median of {args.steps} steps after {args.warmup} warm-up; command `{meta['command']}`", "",
          "| case | shape | JAX s/step | PyTorch s/step | time ratio JAX/PyTorch | JAX peak RSS MiB | "
          "PyTorch peak RSS MiB | memory ratio |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "failed" if v is None else fmt.format(v)  # noqa: E731
    for r in rows:
        md.append(f"| {r['case']} ({r['what']}) | {'x'.join(map(str, r['shape']))} | "
                  f"{f(r['jax']['median_s'], '{:.3f}')} | {f(r['torch']['median_s'], '{:.3f}')} | "
                  f"{f(r['time_ratio_jax_over_torch'], '{:.2f}')} | {f(r['jax']['peak_rss_mib'], '{:.0f}')} | "
                  f"{f(r['torch']['peak_rss_mib'], '{:.0f}')} | {f(r['memory_ratio_jax_over_torch'], '{:.2f}')} |")
    (args.out / "train_step.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

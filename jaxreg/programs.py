"""Compiled programs that a new process does not trace again: ``jax.jit`` plus a store of exported programs.

XLA's persistent compilation cache (``jax_compilation_cache_dir``, which ``jaxreg register`` sets to
``$JAXREG_CACHE_DIR``) saves compilation, but every new process still traces and lowers each program
before it can look the executable up. For the instance optimiser's level programs that was ~0.5 s
each (a warm ``jaxreg register`` traced for ~4 s of its 16.7 s; docs/design.md, issue 18). A function
decorated with :func:`program` behaves as ``jax.jit`` and, while the compilation cache is on, also
keeps the compiled executable of each (function, static arguments, argument shapes and dtypes) it
has run beside that cache (``jax.experimental.serialize_executable``): a later process loads it
without tracing, lowering or compiling. Like XLA's own cache, the store holds executables for this
machine; it is read only from the user's own cache folder. Stored programs compile with
:func:`compiler_options` (on the CPU, LLVM at level 1: a quicker first call; results agree with
``jax.jit``'s to rounding, which the optimiser's path can amplify to the noise of its random samples).

The key covers the function's module and name, the static arguments' ``repr``, the argument tree,
shapes and dtypes, the JAX version, the CPU model, backend and devices, the compiler options, and a
hash of jaxreg's own sources, so changed code never runs a stale program. Anything that fails in
storing or loading falls back to the plain ``jax.jit`` call.
"""
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import pathlib
import pickle
import tempfile
import threading

import jax
import numpy as np

_FAILED = object()
_LOCAL = threading.local()
_PREFETCHED: dict = {}  # store path -> Future of the executable loaded by manifest()'s thread
_TRACED: dict = {}  # store path -> jax.stages.Traced that output_shape made, for _load_or_compile to lower
_USED: list | None = None  # store file names used inside the active manifest() block
_MANIFEST_LOCK = threading.Lock()


@functools.cache
def _sources_hash() -> str:
    h = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def store_dir() -> pathlib.Path | None:
    """Where exported programs are kept: ``<jax_compilation_cache_dir>/jaxreg-programs``, or None when the
    compilation cache is off (then :func:`program` is exactly ``jax.jit``)."""
    if getattr(_LOCAL, "plain", False):
        return None
    base = jax.config.jax_compilation_cache_dir
    return pathlib.Path(base) / "jaxreg-programs" if base else None


@contextlib.contextmanager
def plain_jit():
    """Within this block and thread, every :func:`program` is exactly ``jax.jit`` (no store). For threads that
    run programs on other devices than the first: stored executables are bound to the device they were
    compiled for, and their compilation toggles process-wide state."""
    saved = getattr(_LOCAL, "plain", False)
    _LOCAL.plain = True
    try:
        yield
    finally:
        _LOCAL.plain = saved


def default_device():
    """This thread's default JAX device (``jax.default_device``, e.g. a cohort's thread), else the first."""
    return jax.config.jax_default_device or jax.devices()[0]


def to_device(x, dtype=None) -> jax.Array:
    """A host value (NumPy array, list, scalar) as a ``jax.Array`` of ``dtype``, by a plain transfer.

    ``jnp.asarray`` of a NumPy array runs a one-operation program (``jit(stage)``, and
    ``convert_element_type`` for a new dtype) that is compiled, or looked up in the persistent cache, once
    per shape in every process: 33 such programs in a warm ``jaxreg register`` (issue 18). A ``jax.Array``
    is returned as it is (cast when ``dtype`` differs); a tracer goes to ``jnp.asarray``.
    """
    if isinstance(x, jax.core.Tracer):
        return jax.numpy.asarray(x, dtype)
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == np.dtype(dtype) else x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype))


@contextlib.contextmanager
def manifest(tag: str):
    """Load this job's stored programs in a background thread while it starts.

    The stored executables a block uses are listed under ``tag`` (a description of the job: command,
    options, the scans' shapes and affines) in ``<store>/manifests``. When a later block with the same tag
    starts, a thread loads the listed executables in the order they were first used (deserialisation
    releases the GIL), so they are ready, or nearly, when first called: a warm ``jaxreg register`` spent
    0.5 s loading 26 executables before its programs could run (issue 18). Without a store (compilation
    cache off) or inside another block, this does nothing.
    """
    global _USED
    store = store_dir()
    if store is None or _USED is not None:
        yield
        return
    path, listed, stored = _manifest_listing(store, tag)
    jobs = {p: concurrent.futures.Future() for p in stored}
    with _MANIFEST_LOCK:
        _PREFETCHED.update(jobs)
        _USED = []

    def load():
        from jax.experimental import serialize_executable as se

        for p, fut in jobs.items():
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                with open(p, "rb") as f:
                    fut.set_result(se.deserialize_and_load(*pickle.load(f)))
            except Exception as e:  # noqa: BLE001 - the caller then loads or compiles it itself
                fut.set_exception(e)

    if jobs:
        threading.Thread(target=load, daemon=True).start()
    try:
        yield
    finally:
        with _MANIFEST_LOCK:
            used, _USED = _USED, None
            for p in jobs:
                _PREFETCHED.pop(p, None)
        if used and used != listed:
            _write_atomic(path, used, json.dump, "w")


def _manifest_listing(store: pathlib.Path, tag: str) -> tuple:
    """``(path, listed, stored)`` of the manifest of ``tag``: its file, the store file names it lists (empty
    when it is missing or unreadable) and the paths of those that are in the store. Keyed by this jaxreg's
    sources and JAX's version too: after an upgrade the job's programs change."""
    key = repr((tag, _sources_hash(), jax.__version__))
    path = store / "manifests" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        listed = [n for n in json.loads(path.read_text()) if isinstance(n, str)]
    except (OSError, ValueError, TypeError):
        listed = []
    return path, listed, [store / n for n in listed if (store / n).is_file()]


def manifest_stored(tag: str) -> bool:
    """Whether a :func:`manifest` block with this ``tag`` ran before and every executable it used is stored:
    the job will compile nothing. False without a store. Reads files only (JAX is not started)."""
    store = store_dir()
    if store is None:
        return False
    _, listed, stored = _manifest_listing(store, tag)
    return bool(listed) and len(stored) == len(listed)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def program(fn=None, *, static_argnames=(), donate_argnums=(), quick=False):
    """``jax.jit(fn, static_argnames=..., donate_argnums=...)`` whose programs persist across processes.

    Static arguments must be passed by keyword. Typed PRNG keys among the arguments are fine (they
    travel as their key data). Donation applies to the in-process ``jax.jit`` path only. ``quick``: a
    small program run once or twice per registration, stored with :func:`compiler_options` ``(quick=True)``.
    The returned function also has ``prepare(*args, **kwargs)`` (see :func:`_prepare`): compile the program
    for arguments that may be ``jax.ShapeDtypeStruct`` in a background thread, before it is first called.
    """
    if fn is None:
        return functools.partial(program, static_argnames=static_argnames, donate_argnums=donate_argnums,
                                 quick=quick)
    jitted = jax.jit(fn, static_argnames=static_argnames, donate_argnums=donate_argnums)
    runners = {}  # signature -> executable, _FAILED, or a Future of (executable, store path) from prepare()

    def signature(args, kwargs):
        kwargs = dict(kwargs)
        static = {k: kwargs.pop(k) for k in static_argnames if k in kwargs}
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        keys = tuple(str(jax.random.key_impl(x)) if _is_key(x) else None for x in leaves)
        flat = [jax.random.key_data(x) if k else x for x, k in zip(leaves, keys)]
        sig = tuple((tuple(np.shape(x)), str(getattr(x, "dtype", np.result_type(x))), bool(getattr(x, "weak_type",
                                                                                             False))) for x in flat)
        return static, treedef, keys, flat, (repr(sorted(static.items())), str(treedef), sig, keys)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        store = store_dir()
        if store is None:
            return jitted(*args, **kwargs)
        static, treedef, keys, flat, key = signature(args, kwargs)
        if any(isinstance(x, jax.core.Tracer) for x in flat):  # called inside another trace: inline it
            return jitted(*args, **kwargs)
        runner = runners.get(key)
        path = None
        if isinstance(runner, concurrent.futures.Future):
            runner, path = runner.result()
        elif runner is None:
            runner, path = _load_or_compile(fn, static, treedef, keys, flat, key, store, quick)
        if path is not None:  # loaded from the store: its first run is checked before it is trusted
            try:
                out = jax.block_until_ready(runner(*flat))
            except Exception:  # noqa: BLE001 - e.g. an executable that does not load on this host
                path.unlink(missing_ok=True)
                runner = _FAILED
            else:
                runners[key] = runner
                return out
        runners[key] = runner
        if runner is _FAILED:
            return jitted(*args, **kwargs)
        return runner(*flat)

    def prepare(*args, **kwargs):
        return _prepare(fn, signature(args, kwargs), runners, quick)

    shapes = {}

    def output_shape(*args, **kwargs):
        """``jax.eval_shape`` of the program for these arguments (arrays or ``jax.ShapeDtypeStruct``), kept in
        the store beside its executables: a process that finds it there does not trace the function (the
        tracing that preparing a stored program would otherwise cost every warm call)."""
        static, treedef, keys, flat, key = signature(args, kwargs)  # ask before prepare(): then traced once
        if key in shapes:
            return shapes[key]
        store = store_dir()
        path = None if store is None else _store_path(fn, key, store, quick).with_suffix(".shape")
        try:
            with open(path, "rb") as f:
                out = pickle.load(f)
        except Exception:  # noqa: BLE001 - no store, not stored yet, or unreadable: trace it
            out = None if path is None else _trace_for_compile(fn, static, treedef, keys, flat, path.with_suffix(".pkl"))
            if out is None:
                out = jax.eval_shape(functools.partial(fn, **static), *args,
                                     **{k: v for k, v in kwargs.items() if k not in static})
            if path is not None:
                _write_atomic(path, out)
        shapes[key] = out
        return out

    call._cache_size = jitted._cache_size
    call.prepare = prepare
    call.output_shape = output_shape
    return call


def _write_atomic(path: pathlib.Path, obj, dump=pickle.dump, mode: str = "wb") -> None:
    """Write ``obj`` to ``path`` with ``dump`` (default: pickle) by a rename (readers never see a partial file);
    failures are ignored (the store is a cache)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, mode) as f:
            dump(obj, f)
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 - a store that cannot be written costs only the next process's tracing
        pass


def _prepare(fn, signature, runners, quick) -> bool:
    """Compile ``fn``'s program for one signature in a background thread, so that its first call finds it ready.

    For programs whose arguments are known (as ``jax.ShapeDtypeStruct`` or arrays) before the pipeline reaches
    them, e.g. the deformable levels while the affine stage runs. A new grid size compiles ~20 programs, one
    after the other as the pipeline reaches them, and XLA compiles each on few threads: on an H200 machine (16
    cores) the cold IXI call spent 23 s of its 26 s compiling (issue 18). Does nothing, and returns False,
    without a store (the compiled program could not reach ``jax.jit``'s own cache), when the program is stored
    already (the job's manifest loads it) or prepared already. A preparation that fails costs nothing: the
    first call compiles as usual.
    """
    store = store_dir()
    static, treedef, keys, flat, key = signature
    if store is None or key in runners or _store_path(fn, key, store, quick).exists():
        return False
    future = concurrent.futures.Future()
    runners[key] = future
    device = default_device()

    def work():
        try:
            with jax.default_device(device):
                future.set_result(_load_or_compile(fn, static, treedef, keys, flat, key, store, quick))
        except Exception:  # noqa: BLE001 - the caller then compiles it with plain jit
            future.set_result((_FAILED, None))

    _preparer().submit(work)
    return True


@functools.cache
def _preparer() -> concurrent.futures.ThreadPoolExecutor:
    """The threads of :func:`_prepare`, in submission order: one per 4 cores (at least one). XLA compiles a
    program on ~2 cores, so more threads on a 2-core machine only slowed the pipeline's own programs (IXI pair,
    one thread per program: the affine stage started 2 s later)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) // 4),
                                                 thread_name_prefix="jaxreg-prepare")
    try:  # at exit, drop the preparations not started (the interpreter waits for the pool's threads)
        threading._register_atexit(functools.partial(pool.shutdown, wait=False, cancel_futures=True))
    except AttributeError:  # another Python: exit waits for the queue
        pass
    return pool


@functools.cache
def _machine_tag() -> str:
    """The CPU model (executables are compiled for the host's instruction set) and the backend's devices."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}|{jax.default_backend()}|{jax.devices()[0].device_kind}|{len(jax.devices())}"


@functools.cache
def compiler_options(quick: bool = False) -> dict:
    """XLA options of the stored programs.

    On the CPU backend, LLVM at optimisation level 1 instead of XLA's default. Measured on the IXI 2 mm pair
    (2 cores): the 25 programs of a cold ``jaxreg register`` compiled in 8.9 s instead of 10.2 s, and a warm
    call took the same time (5.2 s; the programs' run time 3.70 vs 3.68 s). Level 0 compiled in 7.0 s but ran
    3.8x slower. ``quick`` programs (small, run once or twice per registration) also skip XLA:CPU's fusion
    emitters, which compiled their HLO ~35 % faster; on the optimiser's loops that cost 0.6 s of run time
    (issue 18).
    """
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_backend_optimization_level": 1, **({"xla_cpu_use_fusion_emitters": False} if quick else {})}


def _store_path(fn, key, store, quick) -> pathlib.Path:
    """The store file of ``fn``'s executable for one signature ``key``."""
    digest = hashlib.sha256(repr((fn.__module__, fn.__qualname__, key, jax.__version__, _machine_tag(),
                                  _sources_hash(), compiler_options(quick))).encode()).hexdigest()[:32]
    return store / f"{fn.__qualname__.strip('_')}-{digest}.pkl"


def _flat_function(fn, static, treedef, keys):
    """``fn`` as a function of the flat argument leaves (PRNG keys as their key data) that stored programs compile."""
    def flat_fn(*xs):
        xs = [jax.random.wrap_key_data(x, impl=k) if k else x for x, k in zip(xs, keys)]
        args, kwargs = jax.tree_util.tree_unflatten(treedef, xs)
        return fn(*args, **kwargs, **static)

    flat_fn.__name__ = flat_fn.__qualname__ = fn.__name__  # compile logs and profiles name the program
    return flat_fn


def _trace_for_compile(fn, static, treedef, keys, flat, path):
    """The output shapes of ``fn``'s program (``jax.ShapeDtypeStruct`` leaves), from the trace that compiling it
    will lower (kept for :func:`_load_or_compile` under the store ``path``): a program whose output shapes the
    preparation needs is traced once, not twice (issue 18). None if tracing fails (the caller then uses
    ``jax.eval_shape``)."""
    try:
        traced = jax.jit(_flat_function(fn, static, treedef, keys)).trace(*flat)
    except Exception:  # noqa: BLE001 - e.g. an argument jit handles but trace() does not
        return None
    with _MANIFEST_LOCK:
        _TRACED[path] = traced
    return jax.tree_util.tree_map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, weak_type=o.weak_type),
                                  traced.out_info)


def _load_or_compile(fn, static, treedef, keys, flat, key, store, quick=False):
    from jax.experimental import serialize_executable as se

    options = compiler_options(quick)
    path = _store_path(fn, key, store, quick)
    with _MANIFEST_LOCK:
        if _USED is not None and path.name not in _USED:
            _USED.append(path.name)
        fut = _PREFETCHED.pop(path, None)
        traced = _TRACED.pop(path, None)
    if fut is not None and fut.cancel():  # not started by the loader thread: load it here
        fut = None
    if fut is not None:
        try:
            return fut.result(), path
        except Exception:  # noqa: BLE001 - load or compile it below
            pass
    if path.exists():
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            return se.deserialize_and_load(payload, in_tree, out_tree), path
        except Exception:  # noqa: BLE001 - unreadable or stale: compile again below
            pass

    try:
        with _fresh_compilation():
            lowered = (traced or jax.jit(_flat_function(fn, static, treedef, keys)).trace(*flat)).lower()
            compiled = lowered.compile(options)
    except Exception:  # noqa: BLE001 - e.g. an argument jit handles but lower() does not: plain jit
        return _FAILED, None
    _write_atomic(path, se.serialize(compiled))
    return compiled, None


class _fresh_compilation:
    """Compile without XLA's persistent cache: an executable that XLA loaded from its cache serialises
    without its code on the CPU backend (measured: "Function ... not found" when the stored copy ran), so
    stored programs are always compiled afresh (and are not written to XLA's cache twice). The switch is
    process-wide, so it is counted: it stays off while any thread (e.g. a :func:`_prepare` thread) compiles."""

    _lock = threading.Lock()
    _depth = 0
    _saved = None

    def __enter__(self):
        from jax._src import compilation_cache as cc

        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                try:
                    cc.is_cache_used(jax.devices()[0].client)  # initialise its memo, then switch it off
                    cls._saved = cc._cache_used
                    cc._cache_used = False
                except Exception:  # noqa: BLE001 - another JAX layout: compile as usual
                    cls._saved = None
            cls._depth += 1
        return self

    def __exit__(self, *exc):
        from jax._src import compilation_cache as cc

        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0 and cls._saved is not None:
                cc._cache_used = cls._saved
                cls._saved = None
        return False


# ----------------------------------------------------------------------------- size classes


def bucket_size(n: int) -> int:
    """The size class of an axis of ``n`` voxels: the smallest ``m * 2**k >= n`` with ``m`` in 4..7.

    So 8, 10, 12, 14, 16, 20, ..., 64, 80, 96, 112, 128, 160, ...: four sizes
    per octave, at most 25 % (usually ~10 %) larger than ``n``. Sizes of 64
    and more are multiples of 16, so the 3-level pyramid divides them exactly.
    Programs whose arrays are padded to their size class compile once for every
    grid of that class (issue 18).
    """
    n = int(n)
    if n <= 8:
        return max(n, 1)
    step = 2 ** (int(np.floor(np.log2(n))) - 2)
    return int(np.ceil(n / step) * step)


def bucket_shape(shape) -> tuple:
    """:func:`bucket_size` of every axis: the grid the instance optimiser and the output programs run on."""
    return tuple(bucket_size(n) for n in shape)


def pad_high(x, shape, mode: str = "constant") -> np.ndarray:
    """A host array padded at the high end of its leading axes to ``shape`` (NumPy ``np.pad`` ``mode``; trailing
    axes, e.g. channels, untouched). ``x`` is returned as a NumPy array, unpadded when it has that shape."""
    x = np.asarray(x)
    widths = [(0, int(n) - s) for n, s in zip(shape, x.shape)]
    if not any(w for _, w in widths):
        return x
    return np.pad(x, widths + [(0, 0)] * (x.ndim - len(widths)), mode=mode)


def pad_to_class(x, ndim: int = 3, mode: str = "constant") -> np.ndarray:
    """A host array's leading ``ndim`` (spatial) axes padded at the high end to their :func:`bucket_shape` (a scan
    sampled by a program: one program per class of scan sizes)."""
    return pad_high(x, bucket_shape(np.shape(x)[:ndim]), mode)


def crop_high(x, shape) -> np.ndarray:
    """The leading ``shape`` of a (padded) array's leading axes, as a NumPy array (a view when ``x`` is one)."""
    return np.asarray(x)[tuple(slice(0, int(n)) for n in shape)]

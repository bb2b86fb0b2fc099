"""jaxreg.programs: jit whose compiled programs a new process loads without tracing."""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import programs

SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # as jaxreg register sets it
    from jaxreg.programs import program
    traced = []

    @program(static_argnames=("power",))
    def f(x, key, scale, *, power):
        traced.append(1)
        return (x ** power) * scale + jax.random.uniform(key, x.shape), {"sum": jnp.sum(x)}

    out, extra = f(jnp.arange(4.0), jax.random.key(3), jnp.float32(2.0), power=int(sys.argv[2]))
    print(len(traced), " ".join(f"{v:.6f}" for v in np.asarray(out)), float(extra["sum"]))
""")


def _run(cache, power=2):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(power)], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), out[1:]


def test_a_new_process_loads_the_program_without_tracing(tmp_path):
    n_first, first = _run(tmp_path)
    n_second, second = _run(tmp_path)
    assert n_first == 1 and n_second == 0  # the body ran (traced) only in the first process
    assert first == second
    assert len(list((tmp_path / "jaxreg-programs").glob("*.pkl"))) == 1
    n_other, other = _run(tmp_path, power=3)  # another static argument: another program
    assert n_other == 1 and other != first
    assert len(list((tmp_path / "jaxreg-programs").glob("*.pkl"))) == 2


def test_a_damaged_store_entry_is_compiled_again(tmp_path):
    _, first = _run(tmp_path)
    for p in (tmp_path / "jaxreg-programs").glob("*.pkl"):
        p.write_bytes(b"not a program")
    n, again = _run(tmp_path)
    assert n == 1 and again == first


def test_same_results_as_jit_inside_and_outside_a_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "store_dir", lambda: tmp_path)

    @programs.program(static_argnames=("k",))
    def g(x, *, k):
        return jnp.cumsum(x) * k

    x = jnp.linspace(0.0, 1.0, 7)
    np.testing.assert_array_equal(np.asarray(g(x, k=3)), np.asarray(jnp.cumsum(x) * 3))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda y: g(y, k=2) + 1)(x)), np.asarray(jnp.cumsum(x) * 2 + 1))
    assert len(list(tmp_path.glob("*.pkl"))) == 1  # the traced call was inlined, not stored
    with pytest.raises(TypeError):
        g(x, k=3, extra=1)


def test_a_program_whose_executable_is_in_xlas_cache_is_stored_runnable(tmp_path):
    """Executables XLA loaded from its own cache serialise without their code on the CPU (they failed with
    "Function ... not found" when the stored copy ran): stored programs are compiled afresh."""
    _, first = _run(tmp_path)
    for p in (tmp_path / "jaxreg-programs").glob("*.pkl"):
        p.unlink()  # as after a jaxreg update: XLA's cache has the program, the store does not
    n, again = _run(tmp_path)
    assert n == 1 and again == first
    n, third = _run(tmp_path)
    assert n == 0 and third == first


MANIFEST_SCRIPT = textwrap.dedent("""
    import sys, threading, time, jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from jax.experimental import serialize_executable as se
    from jaxreg import programs
    loads = []  # the thread of every executable loaded from the store
    original = se.deserialize_and_load
    def spy(*a, **k):
        loads.append(threading.current_thread() is threading.main_thread())
        return original(*a, **k)
    se.deserialize_and_load = spy

    @programs.program
    def f(x):
        return jnp.cumsum(x) * 2.0

    @programs.program
    def g(x):
        return jnp.sin(x)

    with programs.manifest(sys.argv[2]):
        time.sleep(1.0)  # let the loader finish (a program it has not started yet is loaded by the caller)
        out = f(jnp.arange(5.0)) + g(jnp.arange(5.0))
    print(" ".join("main" if m else "thread" for m in loads) or "none", float(out.sum()))
""")


def test_manifest_loads_the_jobs_programs_in_a_thread(tmp_path):
    """The first process lists the stored programs of its job; a second with the same tag gets them from the
    background loader (none loaded on the main thread), with the same result; another tag prefetches nothing."""
    def run(tag):
        return subprocess.run([sys.executable, "-c", MANIFEST_SCRIPT, str(tmp_path), tag], capture_output=True,
                              text=True, check=True).stdout.split()

    first = run("job")
    assert first[0] == "none"  # compiled, nothing loaded
    manifests = list((tmp_path / "jaxreg-programs" / "manifests").glob("*.json"))
    assert len(manifests) == 1
    second = run("job")
    assert second[:-1] == ["thread", "thread"] and second[-1] == first[-1]
    other = run("another job")
    assert other[:-1] == ["main", "main"] and other[-1] == first[-1]


def test_manifest_stored_only_when_every_listed_program_is(tmp_path, monkeypatch):
    subprocess.run([sys.executable, "-c", MANIFEST_SCRIPT, str(tmp_path), "job"], check=True, capture_output=True)
    store = tmp_path / "jaxreg-programs"
    monkeypatch.setattr(programs, "store_dir", lambda: store)
    assert programs.manifest_stored("job")
    assert not programs.manifest_stored("another job")
    monkeypatch.setattr(programs, "_sources_hash", lambda: "an upgraded jaxreg")  # its programs are others
    assert not programs.manifest_stored("job")
    monkeypatch.undo()
    monkeypatch.setattr(programs, "store_dir", lambda: store)
    next(store.glob("*.pkl")).unlink()
    assert not programs.manifest_stored("job")
    monkeypatch.setattr(programs, "store_dir", lambda: None)
    assert not programs.manifest_stored("job")


def test_prepare_compiles_in_the_background_and_the_call_uses_it(compiled_by):
    seen = compiled_by
    traced = []

    @programs.program(static_argnames=("k",))
    def f(x, key, *, k):
        traced.append(1)
        return jnp.cumsum(x) * k + jax.random.uniform(key, x.shape)

    x, key = jnp.linspace(0.0, 1.0, 6), jax.random.key(2)
    assert f.prepare(jax.ShapeDtypeStruct((6,), jnp.float32), key, k=3)
    assert not f.prepare(jax.ShapeDtypeStruct((6,), jnp.float32), key, k=3)  # prepared already
    out = f(x, key, k=3)
    assert len(traced) == 1 and len(seen) == 1 and seen[0][1].startswith("jaxreg-prepare")  # once, in the background
    # another signature (shape, dtype or static argument) is not the prepared one: the call compiles its own
    f(jnp.linspace(0.0, 1.0, 7), key, k=3)
    assert len(traced) == 2 and seen[-1][1] == "MainThread"
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(f.__wrapped__, static_argnames="k")(x, key, k=3)),
                               rtol=1e-6)


def test_prepare_does_nothing_for_a_stored_program_or_without_a_store(tmp_path, monkeypatch):
    @programs.program
    def g(x):
        return jnp.sin(x) * 2.0

    abstract = jax.ShapeDtypeStruct((5,), jnp.float32)
    monkeypatch.setattr(programs, "store_dir", lambda: None)
    assert not g.prepare(abstract)  # no store: plain jit, nothing to prepare
    monkeypatch.setattr(programs, "store_dir", lambda: tmp_path)
    g(jnp.arange(5.0))  # compiled and stored by the call
    assert len(list(tmp_path.glob("*.pkl"))) == 1

    @programs.program
    def g(x):  # noqa: F811 - the same program in a new process: stored, so the manifest's loader has it
        return jnp.sin(x) * 2.0

    assert not g.prepare(abstract)


def test_a_failed_preparation_falls_back_to_the_call(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "store_dir", lambda: tmp_path)

    @programs.program
    def h(x):
        return x[:, 0] * 2.0  # needs two axes

    assert h.prepare(jax.ShapeDtypeStruct((4,), jnp.float32))  # fails in its thread: jit reports it at the call
    with pytest.raises(IndexError):
        h(jnp.arange(4.0))
    np.testing.assert_array_equal(np.asarray(h(jnp.ones((3, 2)))), [2.0, 2.0, 2.0])


def test_output_shape_is_kept_in_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "store_dir", lambda: tmp_path)
    traced = []

    def body(x, *, n):
        traced.append(1)
        return {"head": x[:n], "sum": jnp.sum(x, dtype=jnp.int32)}

    f = programs.program(static_argnames=("n",))(body)
    want = {"head": jax.ShapeDtypeStruct((3, 2), jnp.float32), "sum": jax.ShapeDtypeStruct((), jnp.int32)}
    assert f.output_shape(jax.ShapeDtypeStruct((5, 2), jnp.float32), n=3) == want
    assert len(traced) == 1 and len(list(tmp_path.glob("*.shape"))) == 1
    g = programs.program(static_argnames=("n",))(body)  # as in a new process: read from the store, not traced
    assert g.output_shape(jnp.zeros((5, 2)), n=3) == want and len(traced) == 1
    assert g.output_shape(jnp.zeros((5, 2)), n=4)["head"].shape == (4, 2) and len(traced) == 2


def test_a_program_whose_output_shape_was_asked_is_traced_once(tmp_path, monkeypatch):
    """output_shape keeps its trace for the compilation (issue 18: the preparation of the deformable stage
    traced the level features twice); the program's outputs are those of jax.jit."""
    monkeypatch.setattr(programs, "store_dir", lambda: tmp_path)
    monkeypatch.setattr(programs, "_TRACED", {})
    traced = []

    def body(x, *, n):
        traced.append(1)
        return {"head": x[:n] * 2.0, "sum": jnp.sum(x)}

    f = programs.program(static_argnames=("n",))(body)
    spec = jax.ShapeDtypeStruct((5, 2), jnp.float32)
    assert f.output_shape(spec, n=3)["head"] == jax.ShapeDtypeStruct((3, 2), jnp.float32) and len(traced) == 1
    assert f.prepare(spec, n=3)
    x = jnp.arange(10.0).reshape(5, 2)
    got = f(x, n=3)
    assert len(traced) == 1 and not programs._TRACED
    want = jax.jit(body, static_argnames=("n",))(x, n=3)
    np.testing.assert_array_equal(np.asarray(got["head"]), np.asarray(want["head"]))
    assert float(got["sum"]) == float(want["sum"])

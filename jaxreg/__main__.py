"""The ``jaxreg`` console script (and ``python -m jaxreg``): settings of the process that must precede numpy's
import, then :func:`jaxreg.cli.entry`."""
import os


def entry() -> None:
    """Run the ``jaxreg`` command in this process.

    numpy's OpenBLAS starts one worker thread per core when numpy is imported, and its workers spin for a while
    after each call; the command's BLAS calls are small (affine matrices, label statistics), and on 2 cores the
    spinning competed with XLA: IXI pair, cold -0.6 s (4 interleaved runs each), warm -0.3 s (4 each), with one
    thread (issue 18). ``OPENBLAS_NUM_THREADS`` set by the user is kept.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from jaxreg.cli import entry as run

    run()


if __name__ == "__main__":
    entry()

# make demo / make test: each creates .venv if missing, installs, and runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jaxreg demo --out demo_out --overwrite

# Three pytest runs, each over TEST_WORKERS worker processes (pytest-xdist; a test file stays on one worker so
# its module fixtures are built once). One pytest process over the whole suite crashed inside XLA late in the run,
# after hundreds of compiled programs (locally twice a segfault while compiling for
# tests/train/test_train_dns.py, which alone passes). Two workers on 2 cores: tests/spatial + tests/losses took
# 65 s against 95 s in one process (most tests here wait on single-threaded XLA compilation).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
test: $(STAMP)
	$(PYTEST) tests --ignore=tests/train --ignore=tests/methods --ignore=tests/test_notebooks.py
	$(PYTEST) tests/methods tests/test_notebooks.py
	$(PYTEST) tests/train

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/io_registration.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache

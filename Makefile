# `make run` and `make test` work on a fresh machine: each sets up .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE ?= digits
PORT ?= 8501
# The suite runs in this many processes (pytest-xdist), each test file in one: its cached loaders and runs are made once
TEST_WORKERS ?= 2

.PHONY: setup sandbox ray run test bench browser sample-runs clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

setup: $(STAMP) sandbox

# The Ray engine is an extra (requirements-ray.txt): the tests and benchmarks run it, `make run` does not need it.
RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): requirements-ray.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-ray.txt
	touch $(RAY_STAMP)

ray: $(RAY_STAMP)

# Untrusted models run in a bubblewrap sandbox (README: Threat model); without it the sandbox is "reduced".
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  SUDO=$$(command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq bubblewrap >/dev/null \
	  || { echo "could not install bubblewrap; untrusted models will run in a reduced sandbox"; [ "$$CI" != true ]; }; }

# The end-to-end test drives Debian's Chromium through Playwright; Playwright's own browser download cannot work offline.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$(command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	  || { echo "could not install chromium; the browser test will be skipped"; [ "$$CI" != true ]; }; }

sample-runs: setup
	$(PY) -m analyzers run --model sample:$(SAMPLE) --data sample:$(SAMPLE) --out runs/sample-$(SAMPLE) --overwrite

run: sample-runs
	$(PY) dashboard/serve.py --port $(PORT) --runs-dir runs --run runs/sample-$(SAMPLE)

test: setup ray browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The benchmarks, then the tests too slow for the suite's 20 minutes (marked `benchmark`: retraining the samples).
bench: setup ray
	$(PY) benchmarks/run_benchmarks.py
	$(PY) -m pytest -m benchmark

clean:
	rm -rf runs .pytest_cache

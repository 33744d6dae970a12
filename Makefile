# Two entry points: `make test` and `make demo`. Both build .venv on first use; every install goes
# through constraints.txt so that the CPU build of torch is never replaced by a CUDA download.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench data clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev]"
	touch $(STAMP)

# the install alone (also the first step of every target below)
install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/crossent bench
	$(VENV)/bin/crossent compare --out results/demo-compare

# Optional offline datasets of `crossent compare` (Fashion-MNIST, UCI Letter/Vowel/Shuttle/Satellite); needs
# root for apt. mlbench is unpacked into crossent's cache folder, where the harness looks for it.
data: $(STAMP)
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
	mkdir -p "$${XDG_CACHE_HOME:-$(HOME)/.cache}/crossent/mlbench"
	cd /tmp && apt-get download r-cran-mlbench && \
	  dpkg-deb -x r-cran-mlbench_*.deb "$${XDG_CACHE_HOME:-$(HOME)/.cache}/crossent/mlbench"

bench: $(STAMP)
	$(PY) benchmarks/bench_dense.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

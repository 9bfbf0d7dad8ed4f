# Every target installs what it needs into .venv first (pinned by requirements/lock.txt).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?=
ARGS ?=
TWOTOWER := $(BIN)/twotower $(if $(CONFIG),--config $(CONFIG)) $(ARGS)
PYTEST_ARGS ?=
# one area of the suite, e.g. TESTS=tests/serving (folders match the package's subpackages)
TESTS ?=
COMPOSE := docker compose -f docker/docker-compose.yml
NB_ARGS ?=
LAB_PORT ?= 8888
# JupyterLab fetches a news feed and checks for updates on the internet unless told not to.
LAB_OFFLINE := --LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate

.PHONY: venv run test lint serve query export notebooks lab clean help benchmark-quality benchmark-models benchmark-serving benchmark-faults benchmark-scale benchmark-train benchmark-cold-start benchmark-replay benchmark-prerank benchmark-sequential benchmark-events perf-analyzer docker-up docker-down docker-logs

help:
	@echo "make run | test [TESTS=tests/<area>] | lint | serve | query USER=<id> | export | notebooks | lab | benchmark-quality | benchmark-models | benchmark-serving | benchmark-faults | benchmark-scale | benchmark-train | benchmark-cold-start | benchmark-replay | benchmark-prerank | benchmark-sequential | benchmark-events | clean | docker-up | docker-down | docker-logs"

$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# --no-deps: the lock is the complete, resolved tree (see requirements/base.in)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements/lock.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(TWOTOWER) run

export: venv
	$(TWOTOWER) all

serve: venv
	$(TWOTOWER) serve

query: venv
	@# USER is also the login name in the environment: only a command-line USER counts.
	@test "$(origin USER)" = "command line" || (echo "usage: make query USER=<user id>"; exit 2)
	$(TWOTOWER) query --user $(USER)

benchmark-quality: venv
	$(TWOTOWER) benchmark-quality

# Every model of the family and learning approach on ML-1M, served through Triton (hours on 2 cores; README, "Which two-tower?").
benchmark-models: venv
	$(TWOTOWER) benchmark-models

# Triton's perf_analyzer from tritonclient 2.51.0 (newer ones need glibc 2.38) in its own venv,
# so it does not move the project's tritonclient pin. It needs Debian's libb64-0d: installed here
# when running as root with apt-get; otherwise the serving benchmark runs without perf_analyzer.
TOOLS_VENV ?= .venv-tools
PERF_ANALYZER := $(TOOLS_VENV)/bin/perf_analyzer
CUDART_LIB = $(wildcard $(TOOLS_VENV)/lib/python3*/site-packages/nvidia/cuda_runtime/lib)

$(TOOLS_VENV)/.installed:
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet --disable-pip-version-check "tritonclient[all]==2.51.0" nvidia-cuda-runtime-cu12==12.9.79
	touch $@

perf-analyzer: $(TOOLS_VENV)/.installed
	@ldconfig -p | grep -q libb64.so.0d || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
		&& { apt-get install -y -qq libb64-0d >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; }; }; } \
		|| { echo "perf_analyzer needs the Debian package libb64-0d (apt-get install libb64-0d as root)"; exit 2; }
	@LD_LIBRARY_PATH=$(CUDART_LIB):$$LD_LIBRARY_PATH $(PERF_ANALYZER) --version >/dev/null 2>&1 \
		|| { echo "perf_analyzer from $(TOOLS_VENV) does not run on this machine"; exit 2; }

benchmark-serving: venv
	@if $(MAKE) --no-print-directory perf-analyzer; then \
		LD_LIBRARY_PATH=$$(echo $(abspath $(TOOLS_VENV))/lib/python3*/site-packages/nvidia/cuda_runtime/lib):$$LD_LIBRARY_PATH \
			$(TWOTOWER) --set benchmark.serving.perf_analyzer=$(abspath $(PERF_ANALYZER)) benchmark-serving; \
	else \
		echo "perf_analyzer unavailable (above): benchmarking with the recipe's own load generator only"; \
		$(TWOTOWER) benchmark-serving; \
	fi

# The served recipe under faults (Redis outage, Triton SIGKILL, a killed stage, a 10-minute soak);
# needs an exported run (make export) and redis-server (Debian package redis-server).
benchmark-faults: venv
	$(TWOTOWER) benchmark-faults

# Index kinds, served latency and memory on catalogues of 10^4 to 10^6 items grown from the
# run's item vectors, and Feast at 10^5 and 10^6 users on SQLite and Redis (needs redis-server).
benchmark-scale: venv
	$(TWOTOWER) benchmark-scale

# Live events: events/s and recommend latency at concurrency 8 on the exported run, the time from an
# event's OK to a changed answer, and HR@10/NDCG@10 of the test period with live histories against
# histories as of training (two_tower and seq_attention, each trained in a run of its own).
benchmark-events: venv
	$(TWOTOWER) benchmark-events

# Training throughput of the recipe against the same model in plain tf.keras, a profile of the
# train step, and one epoch at 1x, 4x and 16x the users (about 20 min on 2 cores).
benchmark-train: venv
	$(TWOTOWER) benchmark-train

# The newest items held out from training and added back with refresh-items, against the same
# items trained normally: two full runs of the recipe.
benchmark-cold-start: venv
	$(TWOTOWER) benchmark-cold-start

# Time replayed in slices on ML-1M: twotower retrain (warm start, with and without replay) against
# a full retrain at each cutoff, both scored on the next slice (about 35 min on 2 cores).
benchmark-replay: venv
	$(TWOTOWER) benchmark-replay

# IntTower's Table 2 (ML-1M) as a click-through task: LR, two-tower, DAT, IntTower and DCN-v2,
# without and with training-only mean-rating features.
benchmark-prerank: venv
	$(TWOTOWER) benchmark-prerank

# The sequence towers on generative-recommenders' ML-1M next-item protocol, published rows beside ours
benchmark-sequential: venv
	$(TWOTOWER) benchmark-sequential

test: venv
	$(BIN)/python -m pytest --durations=30 $(PYTEST_ARGS) $(TESTS)

# ruff (style and likely bugs, formatting) and import-linter (the layers and import rules in
# pyproject.toml), from their own venv; tests/recipe/test_layout.py checks the rest of the rules.
LINT_VENV ?= .venv-lint
$(LINT_VENV)/.installed: requirements/lint.txt
	test -x $(LINT_VENV)/bin/python || $(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements/lint.txt
	touch $@

lint: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .
	$(LINT_VENV)/bin/lint-imports --no-cache

# Executes notebooks/ in order, headless, writing their outputs into them (ML-1M by default;
# e.g. NB_ARGS="-p CONFIG=../configs/synthetic.yaml --output-dir /tmp/nb" for a quick run into copies).
notebooks: venv
	$(BIN)/python -m twotower.notebooks $(NB_ARGS)

# JupyterLab from .venv (its kernel is .venv's Python) on loopback, opened on the first notebook.
lab: venv
	$(BIN)/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --no-browser --notebook-dir notebooks $(LAB_OFFLINE) \
		--LabApp.default_url=/lab/tree/01_data_and_nvtabular.ipynb $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf artifacts
	find triton_models -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +

# GPU profile on NVIDIA's Merlin container (README, "Run on a GPU with Docker"); needs
# Docker with the compose plugin and the NVIDIA Container Toolkit, no .venv.
docker-up:
	$(COMPOSE) up -d --build

docker-down:
	$(COMPOSE) down

docker-logs:
	$(COMPOSE) logs --follow --tail=200

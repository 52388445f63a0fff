# The README's two commands: `make demo` and `make test`. Each does whatever
# set-up is missing first (scripts/setup.sh is idempotent and quick on a rerun).
VENV ?= .venv
PY := $(VENV)/bin/python
export AMENT_PREFIX_PATH := $(abspath $(VENV))
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast lint docs test-jazzy repeat-node-tests bench clean

setup:
	@scripts/setup.sh $(VENV)

demo: setup
	$(VENV)/bin/groundlmm demo

test: setup
	$(PY) -m pytest groundlmm_ros/test

# The edit-test loop: everything but the ROS-graph and the slow tests (a minute or two).
test-fast: setup
	$(PY) -m pytest groundlmm_ros/test -m "not ros and not node and not slow"

# ruff's formatter and linter (ruff.toml); CI runs it before the tests.
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# Rewrite the generated docs (model and parameter tables, params.yaml) from their one home.
docs: setup
	$(PY) scripts/generate_docs.py

# The tests that start nodes (marker node) N times in a row: passes, failures and hangs
# (scripts/repeat_node_tests.sh).
N ?= 30
repeat-node-tests: setup
	scripts/repeat_node_tests.sh $(N)

# The ROS-facing tests against the ros-jazzy-* wheels, in a second venv.
test-jazzy:
	scripts/test_jazzy.sh

bench: setup
	$(PY) bench/attention.py
	$(PY) bench/node.py
	$(PY) bench/gpu_latency.py --tiny

clean:
	rm -rf $(VENV) .venv-jazzy build install log

# The two commands of the README: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.alchemist-setup
CONFIG ?= configs/cpu-smollm2.yaml
PYTEST_ARGS ?=
# Two pytest-xdist workers: one runs every integration test in order (they share the session's
# servers), the other runs the unit tests beside them (tests/support/one_worker.py).
PYTEST_WORKERS ?= -n 2

export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run test test-unit test-integration clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh $(wildcard requirements/*.txt)
	bash scripts/setup_env.sh
	touch $(STAMP)

run: setup
	$(VENV)/bin/alchemist-sgl serve --config $(CONFIG)

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
test: setup
	$(PY) -m pytest tests $(PYTEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache

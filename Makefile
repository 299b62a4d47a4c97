# dlbox developer entry points. Every target sets up .venv/ first (once, and again when
# pyproject.toml changes), so `make demo` and `make test` work on a fresh machine: the
# system packages they need (python3-venv; for the tests the OpenSSH server, rsync,
# chromium) are installed by tests/system-deps.sh as root or with passwordless sudo, and
# otherwise it stops at once with the one command to run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := .demo/data
SYSTEM_DEPS := bash tests/system-deps.sh
GOAL := make $(or $(MAKECMDGOALS),venv)
# pytest-xdist workers: a module runs whole on one of them (tests/conftest.py); the suite
# keeps about one core busy per worker.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-fast journey test-deps lint bench clean
.NOTPARALLEL:  # prerequisites in order: system packages are checked before anything runs

$(STAMP): pyproject.toml
	@$(SYSTEM_DEPS) venv '$(GOAL)'
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

venv: $(STAMP)

## demo: generate a sample dataset, then up --local, train the article's scratch CNN, down
demo: $(STAMP)
	@test -d $(DEMO_DATA)/train || $(VENV)/bin/dlbox data sample $(DEMO_DATA) --n 1000 --test-n 100
	$(VENV)/bin/dlbox up --local
	$(VENV)/bin/dlbox train scratch --data $(DEMO_DATA) --test $(DEMO_DATA) --epochs 20 \
		--patience 4; status=$$?; $(VENV)/bin/dlbox down; exit $$status

## test: lint, then the whole suite (what CI runs)
test: test-deps $(STAMP) lint
	$(PY) -m pytest -n $(TEST_WORKERS)

## test-fast: skip the slow end-to-end tests while iterating
test-fast: test-deps $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow"

## journey: one user journey by name, e.g. `make journey J=ssh` (ssh, ec2, machine, spot, cluster)
JOURNEY_ssh := tests/test_journeys.py::test_a_day_on_an_ssh_box
JOURNEY_ec2 := tests/test_journeys.py::test_a_day_on_an_ec2_box
JOURNEY_machine := tests/test_journey_machine.py
JOURNEY_spot := tests/test_spot.py::test_a_spot_run_goes_on_through_a_warned_and_an_unwarned_loss
JOURNEY_cluster := tests/test_cluster.py::test_a_local_cluster_trains_survives_a_killed_node_and_resumes_on_every_node
journey: test-deps $(STAMP)
	@test -n "$(JOURNEY_$(J))" || { echo "make journey J=NAME: NAME is one of ssh, ec2, machine, spot, cluster" >&2; exit 2; }
	$(PY) -m pytest -v $(JOURNEY_$(J))

# what the suite drives: sshd and ssh on loopback, rsync, chromium and chromedriver
test-deps:
	@$(SYSTEM_DEPS) suite '$(GOAL)'

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/pipeline.py

clean:
	rm -rf $(VENV) .demo runs .bench .pytest_cache .ruff_cache *.egg-info

# agentd developer entry points. A fresh Debian/Ubuntu machine needs only python3.11 (with its
# venv module), pip and make: everything else is installed into $(VENV) from pyproject.toml.

VENV ?= .venv
PY ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
PYTEST_ARGS ?=

PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := test
.PHONY: install test test-fast lint demo bench bench-socket bench-fleet clean distclean
.PHONY: deb rpm package-test system-deps

# The stamp is remade whenever pyproject.toml changes. pip itself is not upgraded: the venv's own
# pip is enough for an editable install, and it saves a network round trip.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# pytest's status goes straight to make: 1 (failures), 2-4 (errors) and 5 (no tests collected)
# all fail the target. Nothing here may mask it (no leading '-', no '|| true', no pipe).
system-deps:
	scripts/system-deps.sh

test: $(STAMP) system-deps
	$(PYTHON) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYTHON) -m pytest -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Called as a module so the demo does not depend on the CLI's wiring of `agentd demo`.
demo: $(STAMP)
	$(PYTHON) -m agentd.demo $(DEMO_ARGS)

# agentd against the OpenBao Agent, all scenarios, 3 rounds (about 15 minutes; not in `make test`).
bench: $(STAMP)
	$(PYTHON) bench/compare.py $(BENCH_ARGS)

bench-socket: $(STAMP)
	$(PYTHON) bench/socket_bench.py $(BENCH_ARGS)

# 100 agentd processes against a real 3-node raft OpenBao cluster, 5 scenarios (issue 18; about
# 7 minutes on 2 idle cores; not in `make test`). Smaller: BENCH_ARGS='--agents 10 --outage 20'.
bench-fleet: $(STAMP)
	$(PYTHON) bench/fleet.py $(BENCH_ARGS)

# Packages (packaging/build.sh, nfpm): agentd's wheels for python 3.10-3.13 under /opt/agentd, the
# virtualenv built at install with the target's python. `make deb` is one package for Debian 12/13
# and Ubuntu 22.04/24.04; `make rpm TARGET=el9|el10` (default el9). Reproducible: SOURCE_DATE_EPOCH
# defaults to the last commit's time. Output in dist/.
deb: $(STAMP)
	BUILD_PYTHON=$(PYTHON) packaging/build.sh stage
	BUILD_PYTHON=$(PYTHON) TARGET=$(or $(TARGET),debian) packaging/build.sh deb

rpm: $(STAMP)
	BUILD_PYTHON=$(PYTHON) packaging/build.sh stage
	BUILD_PYTHON=$(PYTHON) TARGET=$(or $(TARGET),el9) packaging/build.sh rpm

# The package tier alone (also part of `make test`): unit checks, package contents, installs in a
# clean mmdebstrap root, and the real unit under systemd-nspawn. Needs root and the apt packages
# that .ci/run installs (rpm, mmdebstrap, systemd-container).
package-test: $(STAMP)
	$(PYTHON) -m pytest -p no:cacheprovider tests/test_units.py tests/test_packages.py \
		tests/test_systemd_nspawn.py $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-run
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

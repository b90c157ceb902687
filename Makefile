# Two entry points a new user needs: `make demo` and `make test`.
# Both set everything up themselves (system tools through apt-get, a virtualenv in .venv).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
DEMO    ?= captures/clean-multi-fragment.pcap

.PHONY: setup system-tools demo test typecheck captures bench clean

setup: system-tools $(STAMP)

system-tools:
	@bash .ci/install-system-tools

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/bits-analyze $(DEMO)

# mypy first (pyproject's [tool.mypy]: strict for the per-packet core, TLS, BITS, reports and
# replay rooms), then the suite.
test: setup
	bash .ci/typecheck
	$(PY) -m pytest -q

typecheck: setup
	bash .ci/typecheck

captures: setup
	$(PY) captures/make_captures.py

# README.md, Performance: the captures (2.2 GB in bench/data, needs root) are made on first use.
bench: setup
	@test -f bench/data/large.pcap -a -f bench/data/small.pcap -a -f bench/data/many.pcap \
		|| $(PY) bench/make_captures.py
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Two commands on a fresh machine: `make run` (the dashboard) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8501

.PHONY: run test bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime
	$(PY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT)

test: $(VENV)/.dev
	$(PY) -m pytest -q

bench: $(VENV)/.runtime
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache

# Everything starts from a machine with only python3: uv (pinned) comes from PyPI into .tools/, then the project's
# environment .venv/ is built from uv.lock, so every machine runs the same versions.
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

.PHONY: install demo test bench clean help

help:
	@echo "make demo   - install, then run the whole pipeline on the embedded defaults"
	@echo "make test   - install, then run the test suite"
	@echo "make bench  - install, then run the benchmarks in bench/ (quick mode: make bench QUICK=--quick)"
	@echo "make clean  - remove the environment and everything the demo wrote"

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Bytecode is compiled once here (~20 s): where PYTHONDONTWRITEBYTECODE is set, as on our CI machines, every
# process would otherwise compile MLflow & co. from source on each start (`personalize history churn`: 7.8 s -> 3.3 s;
# every server, worker and MLflow Project step pays it).
$(VENV)/.installed: $(UV) uv.lock pyproject.toml
	$(UV) sync --frozen --all-extras --python $(PYTHON) --compile-bytecode
	$(VENV)/bin/python -m compileall -q personalize features training serving monitoring
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/personalize demo

test: install
	$(VENV)/bin/python -m pytest

bench: install
	$(VENV)/bin/python bench/features.py $(QUICK)
	$(VENV)/bin/python bench/quality.py $(QUICK)
	$(VENV)/bin/python bench/quality_handset.py $(QUICK)
	$(VENV)/bin/python bench/serving.py $(QUICK)
	$(VENV)/bin/python bench/serving_asgi.py $(QUICK)
	$(VENV)/bin/python bench/monitoring.py $(QUICK)
	$(VENV)/bin/python bench/decisions.py $(QUICK)
	$(VENV)/bin/python bench/scale.py $(QUICK)

clean:
	rm -rf $(VENV) $(TOOLS) .personalize .pytest_cache .hypothesis

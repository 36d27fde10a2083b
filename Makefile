# Two commands do everything on a fresh machine:
#   make demo   create the environment (first time), then train on the embedded defaults
#   make test   create the environment (first time), then lint and run the test suite
PYTHON ?= python3
VENV := .venv
# CPU machines: pin torch to the CPU build, else pip pulls the newest CUDA build (GBs).
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)

$(VENV)/.installed: pyproject.toml constraints-cpu.txt reid_platform/torchvision_hook.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q $(CONSTRAINTS) -e ".[dev]"
	# plain `import timm` / `import torchvision` in this venv (notebooks): a lazy import hook
	$(VENV)/bin/python reid_platform/torchvision_hook.py
	touch $@

.PHONY: install demo test lint bench
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/python jobs/train.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/train_throughput.py

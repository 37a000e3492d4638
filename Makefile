# One command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3

.PHONY: install demo test lint

# torch first, pinned, where none is installed: an unpinned torch requirement
# would pull the CUDA build with several GB of packages on a CPU machine.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps torchode==1.0.1 torchtyping==0.1.5 "typeguard>=2.11.1,<3"  # bench's torchode peer; --no-deps keeps the installed torch (torchtyping 0.1.4 fails to import on torch 2.13)
	$(PYTHON) -m sparsekern.backends.cpu  # build (or load the cached) C++ CPU kernels

demo: install
	$(PYTHON) -m flows demo --out runs/demo

test: install
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .

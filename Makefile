# One command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3

.PHONY: install demo test lint

# torch first, pinned, where none is installed: an unpinned torch requirement
# would pull the CUDA build with several GB of packages on a CPU machine.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m sparsekern.backends.cpu  # build (or load the cached) C++ CPU kernels

demo: install
	$(PYTHON) -m flows demo --out runs/demo

test: install
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .

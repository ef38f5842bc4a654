# Everything a fresh machine with only python3 needs: `make demo` and `make test` install what they use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.diffseg-installed
# torch 2.13.0 is the CPU wheel that lies on this machine's disk; a bare `torch` pulls several GB of CUDA.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[train,export,test]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the shipped default: segment the demo FLAIR volume, write NIfTI maps and overview.png.
demo: $(STAMP)
	$(BIN)/python -m diffseg_engine demo --out demo-out

## The test suite (real data from ../shared/data when present).
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo-out build *.egg-info

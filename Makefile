# Everything a fresh machine with only python3 needs: `make demo` and `make test` install what they use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.diffseg-installed
# torch 2.13.0 is the CPU wheel that lies on this machine's disk; a bare `torch` pulls several GB of CUDA.
TORCH  ?= torch==2.13.0

.PHONY: install browser demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[train,export,test]'
	touch $(STAMP)

install: $(STAMP)

## Headless Chromium for the page tests (Debian packages chromium + chromium-driver), installed where this user
## may (root with apt-get); elsewhere those tests are skipped, saying so.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver (Debian) for the page tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	    echo "note: chromium could not be installed; the page tests will be skipped"; \
	  else \
	    echo "note: no chromium-driver (apt-get install chromium chromium-driver); the page tests will be skipped"; \
	  fi; }

## The main job on the shipped default: segment the demo FLAIR volume, write NIfTI maps and overview.png.
demo: $(STAMP)
	$(BIN)/python -m diffseg_engine demo --out demo-out

## The test suite (real data from ../shared/data when present).
test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo-out build *.egg-info

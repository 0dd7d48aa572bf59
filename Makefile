# gnnq set-up and entry points. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
SHARED_DATA ?= ../shared/data
# Datasets: a writable mirror (symlinks) of the shared raw files; PyG writes processed/ here.
export GNNQ_DATA ?= $(CURDIR)/data
UI_PORT ?= 5000

.PHONY: install data browser run test ui clean

$(BIN)/gnnq: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/gnnq

# The C++ kernels build now rather than inside the first job or test that needs them.
install: $(BIN)/gnnq
	$(BIN)/python -m gnnq.kernels

data:
	@if [ -d "$(SHARED_DATA)" ]; then \
	  mkdir -p "$(GNNQ_DATA)" && cp -rsn --no-preserve=mode "$$(cd $(SHARED_DATA) && pwd)/." "$(GNNQ_DATA)/"; \
	else echo "note: $(SHARED_DATA) not found; datasets load from $(GNNQ_DATA) or download"; fi

run: install data
	$(BIN)/gnnq train +quant=a2q dataset=cora

# Headless Chromium for the MLflow UI test (tests/test_mlflow_ui.py), from Debian's packages
# when it is missing and apt-get is usable; otherwise that one test is skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null && \
	    echo "installed chromium (Debian) for the MLflow UI test"; } || \
	  echo "note: chromium could not be installed; the MLflow UI browser test will be skipped"

test: install data browser
	$(BIN)/python -m pytest -q --durations=15 tests

ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT) --workers 1

clean:
	rm -rf outputs multirun .pytest_cache

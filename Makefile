# gnnq set-up and entry points. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
SHARED_DATA ?= ../shared/data
# Datasets: a writable mirror (symlinks) of the shared raw files; PyG writes processed/ here.
export GNNQ_DATA ?= $(CURDIR)/data
UI_PORT ?= 5000

.PHONY: install data run test ui clean

$(BIN)/gnnq: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/gnnq

install: $(BIN)/gnnq

data:
	@if [ -d "$(SHARED_DATA)" ]; then \
	  mkdir -p "$(GNNQ_DATA)" && cp -rsn --no-preserve=mode "$$(cd $(SHARED_DATA) && pwd)/." "$(GNNQ_DATA)/"; \
	else echo "note: $(SHARED_DATA) not found; datasets load from $(GNNQ_DATA) or download"; fi

run: install data
	$(BIN)/gnnq train +quant=a2q dataset=cora

test: install data
	$(BIN)/python -m pytest -q tests

ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT) --workers 1

clean:
	rm -rf outputs multirun .pytest_cache

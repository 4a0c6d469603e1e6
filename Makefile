# modrm: every target creates the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch release the test suite runs on; on a machine with a GPU, PyPI's build of it carries CUDA.
TORCH ?= torch==2.13.0

DATA ?= data/generated/synth.jsonl
CACHE ?= cache/demo
ENCODER ?= Qwen/Qwen3-Embedding-0.6B
CHECKPOINT ?= artifacts/heads
OUT ?= artifacts/eval
DEVICE ?= auto
SPLIT ?= test
CONFIG ?=
CONFIG_FLAG := $(if $(CONFIG),--config $(CONFIG),)
MODRM := $(BIN)/modrm

DEMO_ENCODER := sentence-transformers/all-MiniLM-L6-v2
DEMO_DATA := data/generated/demo.jsonl

.PHONY: install embed train-heads finetune eval demo test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,lora]"
	touch $@

embed: install
	$(MODRM) embed --data $(DATA) --cache $(CACHE) --encoder $(ENCODER) --device $(DEVICE) $(CONFIG_FLAG)

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf cache/demo artifacts data/generated

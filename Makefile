# modrm: every target creates the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch release the test suite runs on; on a machine with a GPU, PyPI's build of it carries CUDA.
TORCH ?= torch==2.13.0

DATA ?= data/generated/synth.jsonl
ENCODER ?= Qwen/Qwen3-Embedding-0.6B
# one cache folder per encoder, so no target points one encoder at another's cache
CACHE ?= cache/$(subst /,--,$(ENCODER))
CHECKPOINT ?= artifacts/heads
OUT ?= artifacts/eval
DEVICE ?= auto
SPLIT ?= test
CONFIG ?=
CONFIG_FLAG := $(if $(CONFIG),--config $(CONFIG),)
MODRM := $(BIN)/modrm
# Processes on this machine for the commands that take several (embed, finetune): NPROC > 1 starts them with torchrun
# (--standalone: a free port, one node), e.g. `make finetune NPROC=4`, one per GPU (gloo on CPU).
NPROC ?= 1
LAUNCH := $(if $(filter-out 1,$(NPROC)),$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) $(MODRM),$(MODRM))

DEMO_ENCODER := sentence-transformers/all-MiniLM-L6-v2
DEMO_DATA := data/generated/demo.jsonl

STAGE1 ?= artifacts/stage1
DEMO_DIR := artifacts/demo

.PHONY: install synth embed train-heads finetune eval serve demo test test-fast bench bench-rl bench-gpu lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,lora]"
	touch $@

synth: install
	$(MODRM) synth --out $(DATA) --pairs-per-module 1000 $(CONFIG_FLAG)

embed: install
	$(LAUNCH) embed --data $(DATA) --cache $(CACHE) --encoder $(ENCODER) --device $(DEVICE) $(CONFIG_FLAG)

train-heads: install
	$(MODRM) train-heads --cache $(CACHE) --out $(CHECKPOINT) --device $(DEVICE) $(CONFIG_FLAG)

finetune: install
	$(LAUNCH) finetune --checkpoint $(CHECKPOINT) --data $(DATA) --out $(STAGE1) --device $(DEVICE) $(CONFIG_FLAG)

eval: install
	$(MODRM) eval --checkpoint $(CHECKPOINT) --data $(DATA) --out $(OUT) --split $(SPLIT)

# Rewards over HTTP for RL loops (OpenRLHF: --reward.remote_url http://127.0.0.1:$(PORT)/get_reward).
PORT ?= 8000
HOST ?= 127.0.0.1
serve: install
	$(MODRM) serve --checkpoint $(CHECKPOINT) --host $(HOST) --port $(PORT) --device $(DEVICE)

# The whole chain on the offline MiniLM, CPU, from scratch each time: one-round trajectories, three negatives in
# four swapped (the module names the task's component and another in each other's roles, in the same words) ->
# embed (short texts: configs/demo.toml) -> train-heads -> finetune (the default stage-1 settings) -> eval of both
# on the test split (task groups training never sees).
DEMO_CONFIG := configs/demo.toml
demo: install
	rm -rf cache/demo $(DEMO_DIR)
	$(MODRM) synth --out $(DEMO_DATA) --pairs-per-module 150 --seed 0 --max-rounds 1 --swapped-share 0.75
	$(MODRM) embed --data $(DEMO_DATA) --cache cache/demo --encoder $(DEMO_ENCODER) --device cpu --config $(DEMO_CONFIG)
	$(MODRM) train-heads --cache cache/demo --out $(DEMO_DIR)/stage0 --device cpu
	$(MODRM) finetune --checkpoint $(DEMO_DIR)/stage0 --data $(DEMO_DATA) --out $(DEMO_DIR)/stage1 --device cpu
	$(MODRM) eval --checkpoint $(DEMO_DIR)/stage0 --checkpoint $(DEMO_DIR)/stage1 --data $(DEMO_DATA) \
		--out $(DEMO_DIR)/eval

bench: install
	$(BIN)/python bench/bench_embed.py
	$(BIN)/python bench/bench_cache.py
	$(BIN)/python bench/bench_embed_memory.py
	$(BIN)/python bench/bench_heads.py
	$(BIN)/python bench/bench_finetune.py
	$(BIN)/python bench/bench_ddp_finetune.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_pairs.py
	$(BIN)/python bench/bench_learn.py

# Does the module reward help RL? Seven arms of a toy multi-module agent over 10 seeds, the reward model through
# `modrm serve` (results, plot and cached models in artifacts/bench-rl; RL_FLAGS="--checkpoint DIR" for your own).
RL_FLAGS ?=
bench-rl: install
	$(BIN)/python bench/bench_rl.py $(RL_FLAGS)

# The GPU check, one call of about 8 minutes: the cuda tests and bench/bench_gpu.py's default sections, on a Python
# that has torch with CUDA and modrm importable (a GPU machine's own: `pip install --no-deps --no-build-isolation -e .`;
# or GPU_PYTHON=.venv/bin/python). GPU_FLAGS="--only all" runs every section.
GPU_PYTHON ?= python3
GPU_FLAGS ?=
bench-gpu:
	$(GPU_PYTHON) bench/bench_gpu.py $(GPU_FLAGS)

# One worker per core (one thread each), whole files per worker so module fixtures are built once.
test: install
	$(BIN)/pytest -n auto --dist loadfile --no-loadscope-reorder

# The everyday loop: the suite without the tests marked slow.
test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf cache/demo artifacts data/generated

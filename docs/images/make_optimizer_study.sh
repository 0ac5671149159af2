#!/usr/bin/env bash
# Reruns the README's measured CPU study and copies its pictures, in one line (about 60-80 min on 2 CPU cores):
#   bash docs/images/make_optimizer_study.sh
# 1. tune: Adam, AdamW, Muon x 6 learning rates (1e-3 .. 3.2e-2) x seeds 1,2 (experiment=optimizer_cpu_tune),
#    two jobs at a time;
# 2. python -m kimi_lab.stats.tune -> reports/optimizer_cpu_tune/ (tuning.csv, lr_sensitivity.png, confirm_command.txt);
# 3. the confirm command it wrote (each optimizer at its tuned LR, seeds 11-42), then the report;
# 4. lr_sensitivity.png and the confirm report's effects.png -> docs/images/optimizer_cpu_*.png.
# The wall time of the whole study is printed at the end (the README quotes it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
TUNE=multirun/optimizer_cpu_tune
POOL=(hydra/launcher=gpu_pool 'hydra.launcher.devices=[0]' hydra.launcher.jobs_per_device=2 hardware.num_threads=1)
started=$(date +%s)
"$PYTHON" train.py -m experiment=optimizer_cpu_tune "${POOL[@]}" hydra.sweep.dir="$TUNE" sweep.skip_completed=true
"$PYTHON" -m kimi_lab.stats.tune "$TUNE"
PYTHON="$PYTHON" bash -c "$(sed "s#^python #$PYTHON #" reports/optimizer_cpu_tune/confirm_command.txt) sweep.skip_completed=true"
"$PYTHON" -m kimi_lab.stats.report "${TUNE}_confirm"
cp reports/optimizer_cpu_tune/lr_sensitivity.png docs/images/optimizer_cpu_lr_sensitivity.png
cp reports/optimizer_cpu_tune_confirm/effects.png docs/images/optimizer_cpu_effects.png
echo "docs/images/optimizer_cpu_{lr_sensitivity,effects}.png updated; study wall time $(( ($(date +%s) - started) / 60 )) min"

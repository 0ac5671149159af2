#!/usr/bin/env bash
# Reruns the README's measured CPU study and copies its pictures, in one line (about 55 min on 2 CPU cores):
#   bash docs/images/make_optimizer_study.sh
# 1. tune: Adam, AdamW, Muon x 5 learning rates x seeds 1,2 (experiment=optimizer_cpu_tune), two jobs at a time;
#    Adam's best LR fell on the grid's lowest value, so 1e-3 is added for Adam as `make tune` asked;
# 2. python -m kimi_lab.stats.tune -> reports/optimizer_cpu_tune/ (tuning.csv, lr_sensitivity.png, confirm_command.txt);
# 3. the confirm command it wrote (each optimizer at its tuned LR, seeds 11-18), then the report;
# 4. lr_sensitivity.png and the confirm report's effects.png -> docs/images/optimizer_cpu_*.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
TUNE=multirun/optimizer_cpu_tune
POOL=(hydra/launcher=gpu_pool 'hydra.launcher.devices=[0]' hydra.launcher.jobs_per_device=2 hardware.num_threads=1)
"$PYTHON" train.py -m experiment=optimizer_cpu_tune "${POOL[@]}" hydra.sweep.dir="$TUNE" sweep.skip_completed=true
"$PYTHON" train.py -m experiment=optimizer_cpu_tune optimizer=adam optimizer.lr=1e-3 "${POOL[@]}" \
    hydra.sweep.dir="$TUNE/extend_adam" sweep.skip_completed=true
"$PYTHON" -m kimi_lab.stats.tune "$TUNE"
PYTHON="$PYTHON" bash -c "$(sed "s#^python #$PYTHON #" reports/optimizer_cpu_tune/confirm_command.txt) sweep.skip_completed=true"
"$PYTHON" -m kimi_lab.stats.report "${TUNE}_confirm"
cp reports/optimizer_cpu_tune/lr_sensitivity.png docs/images/optimizer_cpu_lr_sensitivity.png
cp reports/optimizer_cpu_tune_confirm/effects.png docs/images/optimizer_cpu_effects.png
echo "docs/images/optimizer_cpu_{lr_sensitivity,effects}.png updated"

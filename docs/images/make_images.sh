#!/usr/bin/env bash
# Regenerates the README's pictures from a real CPU sweep of the current code, in one line:
#   bash docs/images/make_images.sh            # about 10 min on 2 CPU cores; FRESH=1 bash ... trains anew
# 1. a 6-job sweep: LayerNorm vs RMSNorm at the CPU studies' size (+study=cpu: the tiny preset on UTF-8 bytes,
#    1,000 steps of 16 x 64 tokens), seeds 1-3, one thread per job -> multirun/readme_norm/
#    (sweep.skip_completed=true: a second call reuses finished jobs; FRESH=1 deletes this script's own sweep and
#    report folders first, so every job trains again);
# 2. its report -> reports/readme_norm/ (python -m kimi_lab.stats.report);
# 3. the report's effects and validation-curve PNGs -> docs/images/readme_norm_*.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
SWEEP=multirun/readme_norm
REPORT=reports/readme_norm
if [ "${FRESH:-0}" = 1 ]; then rm -rf "$SWEEP" "$REPORT"; fi
"$PYTHON" train.py -m +study=cpu norm=layernorm,rmsnorm seed=1,2,3 hardware.num_threads=1 \
    hydra.sweep.dir="$SWEEP" sweep.skip_completed=true
"$PYTHON" -m kimi_lab.stats.report "$SWEEP" --out "$REPORT"
for name in effects val_loss_curves; do
    cp "$REPORT/$name.png" "docs/images/readme_norm_$name.png"
    echo "docs/images/readme_norm_$name.png  <- $REPORT/$name.png"
done

#!/usr/bin/env bash
# The Scientific grid of the README's results on a GPU: reproduce.py with --device cuda and 8 cells at once (the
# processes share the GPU), then the wall time of every task from the grid's log.
#
#   benchmarks/gpu_grid.sh                                     # on the GPU machine, from the repository root
#   DEVICE=cpu JOBS=2 TINY=1 benchmarks/gpu_grid.sh            # the same script on a tiny grid, to check it on a CPU
#
# Settings (environment): DEVICE (cuda), JOBS (8), OUT (runs/gpu-grid/<dataset>), DATA (data/scientific, imported
# from ../shared/data/scientific when missing), BACKBONE (minilm), EXTRA (more reproduce.py flags). TINY=1 swaps
# in the built-in synthetic data, the tiny backbone and one-epoch runs. A second call resumes the grid.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-8}
if [[ "${TINY:-0}" == 1 ]]; then
  DATA=${DATA:-data/synthetic}
  [[ -d $DATA ]] || $PY prepare_data.py synthetic --out "$DATA"
  GRID=(--backbone tiny --seeds 42 --epochs 1 --finetune-epochs 1 --finetune-val-users 50 --transforms none center)
else
  DATA=${DATA:-data/scientific}
  if [[ ! -d $DATA ]]; then
    $PY prepare_data.py lcrec --inter ../shared/data/scientific/Scientific.inter.json \
      --items ../shared/data/scientific/Scientific.item.json --out "$DATA"
  fi
  GRID=(--backbone "${BACKBONE:-minilm}" --backbone-name all-MiniLM-L6-v2 --seeds 42 43 --transforms none center
        --epochs 200 --patience 10 --sasrec-lr 1e-3 --bert4rec-lr 1e-3 --finetune-lr 1e-4)
fi
OUT=${OUT:-runs/gpu-grid/$(basename "$DATA")}
began=$(date +%s)
# shellcheck disable=SC2086  # EXTRA holds several flags
$PY reproduce.py --data "$DATA" --out "$OUT" --device "$DEVICE" --jobs "$JOBS" --sample-sizes 100 -1 "${GRID[@]}" ${EXTRA:-}
echo "grid wall time: $(( $(date +%s) - began )) s on $DEVICE with --jobs $JOBS"
echo "per task (from $OUT/grid.log):"
grep -E '\] (done|FAILED) ' "$OUT/grid.log" | sed -E 's/^\[[^]]+\] /  /; s/;.*//'

#!/usr/bin/env bash
# Every run behind docs/results.md, then its figures. Needs the offline datasets (`make data`).
#
#   benchmarks/regenerate_results.sh            # all experiments, JOBS at a time (default 2)
#   JOBS=1 benchmarks/regenerate_results.sh     # one at a time
#   benchmarks/regenerate_results.sh figures    # only redraw docs/img from the results folders
#
# About 70 CPU-minutes in all (one thread per run): with two runs at a time on two idle cores, about
# 40 minutes. Results land in results/docs/NAME, figures in docs/img.
set -euo pipefail
cd "$(dirname "$0")/.."
CROSSENT=${CROSSENT:-"python -m crossent"}
OUT=${OUT:-results/docs}
JOBS=${JOBS:-2}

NOISY_LOSSES="ce,gce:q=0.7,sce:alpha=0.1:beta=1,apl:alpha=5:beta=5,ldr_kl:normalize=softplus"

commands() {
  # Letter under the LDR-KL reference setup (100 epochs, 5 seeds); longest first
  echo "--dataset letter --protocol ldr --losses $NOISY_LOSSES --noise ldr-uniform --noise-rate 0.6 --seeds 5 --out $OUT/letter-uniform"
  echo "--dataset letter --protocol ldr --losses $NOISY_LOSSES --noise ldr-class-dependent --noise-rate 0.3 --seeds 5 --out $OUT/letter-class-dependent"
  # calibration and long tail on Fashion-MNIST (3 seeds)
  echo "--dataset fashion-mnist --train-size 10000 --hidden 256,128,100 --lr 1e-3 --epochs 40 --calibrate --losses ce,ce:label_smoothing=0.05,focal:gamma=3,squentropy --seeds 3 --out $OUT/fashion-calibration"
  echo "--dataset fashion-mnist --imbalance 100 --hidden 256,128 --lr 1e-3 --epochs 10 --losses ce,focal:gamma=1,cb:beta=0.9999,cb:beta=0.9999:loss=focal:gamma=1,la,la_posthoc --seeds 3 --out $OUT/fashion-lt"
  echo "--dataset letter --protocol ldr --losses ce,sce:alpha=0.1:beta=1 --seeds 3 --out $OUT/letter-clean"
  # the wider network of earlier versions of this page, as a named variant (3 seeds)
  echo "--dataset letter --protocol ldr-wide --losses ce,sce:alpha=0.1:beta=1 --noise ldr-uniform --noise-rate 0.6 --seeds 3 --out $OUT/letter-wide-uniform"
  echo "--dataset letter --protocol ldr-wide --losses ce,sce:alpha=0.1:beta=1 --noise ldr-class-dependent --noise-rate 0.3 --seeds 3 --out $OUT/letter-wide-class-dependent"
  # forward correction needs a CE model first: 3 trainings per seed (2 seeds)
  echo "--dataset letter --protocol ldr --losses forward_correction,forward_correction:T=oracle --noise ldr-class-dependent --noise-rate 0.3 --seeds 2 --out $OUT/letter-forward-correction"
  # MNIST-1D baselines of the reference code (seeds 42-46)
  for model in linear mlp cnn; do
    echo "--dataset mnist1d --protocol mnist1d --model $model --losses ce --seeds 5 --out $OUT/mnist1d-$model"
  done
  echo "--dataset mnist1d --protocol mnist1d --model mlp --no-residual --losses ce --seeds 5 --out $OUT/mnist1d-mlp-plain"
  echo "--dataset mnist1d --protocol mnist1d --model mlp --hidden 256,256 --losses ce --seeds 5 --out $OUT/mnist1d-mlp256"
}

figures() {
  python benchmarks/noise_definitions.py > "$OUT/noise-definitions.md"
  python benchmarks/results_figures.py --results "$OUT" --img docs/img > "$OUT/tables.md"
}

mkdir -p "$OUT"
if [ "${1:-all}" != figures ]; then
  commands | xargs -P "$JOBS" -I{} sh -c "$CROSSENT compare {} --quiet --no-plots > /dev/null"
fi
figures

#!/usr/bin/env bash
# Every run behind docs/results.md, then its figures. Needs the offline datasets (`make data`).
#
#   benchmarks/regenerate_results.sh            # all experiments, JOBS at a time (default 2)
#   JOBS=1 benchmarks/regenerate_results.sh     # one at a time
#   benchmarks/regenerate_results.sh figures    # only redraw docs/img from the results folders
#   ONLY=mnist1d benchmarks/regenerate_results.sh   # the experiments whose name matches (grep -E)
#
# About 100 CPU-minutes in all (one thread per run; a Letter run is 28,000 steps, about a minute):
# with two runs at a time on two idle cores, about 50 minutes. Results land in results/docs/NAME/seed-K (a finished seed is not run again), figures in
# docs/img, the tables of the page in results/docs/tables.md. Every run's results.json records its
# provenance (commit, torch, CPU, threads), which the tables print under each table.
set -euo pipefail
cd "$(dirname "$0")/.."
CROSSENT=${CROSSENT:-"python -m crossent_harness"}
OUT=${OUT:-results/docs}
JOBS=${JOBS:-2}

OTHER_LOSSES="gce:q=0.7,apl:alpha=5:beta=5,ldr_kl:normalize=softplus"

# NAME|SEEDS|ARGS: one experiment. The k-th word of SEEDS is the seed it runs in round k ("-": none),
# and each seed runs as its own command into $OUT/NAME/seed-K, so that an interrupted regeneration
# keeps what finished and every experiment gains seeds round by round. NAME@PART writes seed-K-PART
# into the same folder (more losses for some seeds only); the figures merge every seed-* folder.
EXPERIMENTS=(
  # Letter under the LDR-KL reference setup (100 epochs): CE and SCE on every seed, the other losses on two
  "letter-uniform|0 1 2 3 4|--dataset letter --protocol ldr --losses ce,sce:alpha=0.1:beta=1 --noise ldr-uniform --noise-rate 0.6"
  "letter-class-dependent|0 1 2 3 4|--dataset letter --protocol ldr --losses ce,sce:alpha=0.1:beta=1 --noise ldr-class-dependent --noise-rate 0.3"
  "letter-uniform@others|0 - - - 1|--dataset letter --protocol ldr --losses $OTHER_LOSSES --noise ldr-uniform --noise-rate 0.6"
  "letter-class-dependent@others|0 - - - 1|--dataset letter --protocol ldr --losses $OTHER_LOSSES --noise ldr-class-dependent --noise-rate 0.3"
  "letter-clean|0 1 2|--dataset letter --protocol ldr --losses ce,sce:alpha=0.1:beta=1"
  # MNIST-1D baselines of the reference code
  "mnist1d-linear|42 43 44 45 46|--dataset mnist1d --protocol mnist1d --model linear --losses ce"
  "mnist1d-mlp|42 43 44 45 46|--dataset mnist1d --protocol mnist1d --model mlp --losses ce"
  "mnist1d-cnn|42 43 44 45 46|--dataset mnist1d --protocol mnist1d --model cnn --losses ce"
  "mnist1d-mlp-plain|42 43 44 45 46|--dataset mnist1d --protocol mnist1d --model mlp --no-residual --losses ce"
  "mnist1d-mlp256|42 43 44 45 46|--dataset mnist1d --protocol mnist1d --model mlp --hidden 256,256 --losses ce"
  # calibration and long tail on Fashion-MNIST
  "fashion-calibration|0 1 2|--dataset fashion-mnist --train-size 10000 --hidden 256,128,100 --lr 1e-3 --epochs 40 --calibrate --losses ce,ce:label_smoothing=0.05,focal:gamma=3,squentropy"
  "fashion-lt|0 1 2|--dataset fashion-mnist --imbalance 100 --hidden 256,128 --lr 1e-3 --epochs 10 --losses ce,focal:gamma=1,cb:beta=0.9999,cb:beta=0.9999:loss=focal:gamma=1,la,la_posthoc"
  # the wider network of earlier versions of this page, as a named variant
  "letter-wide-uniform|0 1 2|--dataset letter --protocol ldr-wide --losses ce,sce:alpha=0.1:beta=1 --noise ldr-uniform --noise-rate 0.6"
  "letter-wide-class-dependent|0 1 2|--dataset letter --protocol ldr-wide --losses ce,sce:alpha=0.1:beta=1 --noise ldr-class-dependent --noise-rate 0.3"
  # forward correction trains a CE model first: 3 trainings per seed
  "letter-forward-correction|- - - - 0|--dataset letter --protocol ldr --losses forward_correction,forward_correction:T=oracle --noise ldr-class-dependent --noise-rate 0.3"
)

commands() {
  for round in 0 1 2 3 4; do
    for entry in "${EXPERIMENTS[@]}"; do
      IFS='|' read -r name seeds args <<< "$entry"
      [ -z "${ONLY:-}" ] || echo "$name" | grep -qE "$ONLY" || continue
      seed=$(echo $seeds | cut -d' ' -f$((round + 1)))
      [ -n "$seed" ] && [ "$seed" != - ] || continue
      folder=${name%@*}
      part=$([ "$folder" != "$name" ] && echo "-${name#*@}" || true)
      out="$OUT/$folder/seed-$seed$part"
      # a finished seed is not run again; SKIP_STARTED=1 also skips one that has begun
      grep -qs '"complete": true' "$out/results.json" && continue
      [ "${SKIP_STARTED:-0}" = 1 ] && [ -e "$out" ] && continue
      echo "$args --seed $seed --seeds 1 --out $out"
    done
  done
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

#!/usr/bin/env bash
# The default model's by-drive protocol: each recipe trained with one drive held out and
# scored on that drive (streets the run never saw), and trained on every frame for shipping.
# All runs of a recipe share its flags; they run in parallel (one GPU holds them all).
#
#   bash configs/default_model/by_drive.sh DATA OUT SECONDS [DEVICE] [RECIPE...]
#
# DATA: a CamVid-layout folder (images/{train,val}, labels/..., id2label.json, README.md);
# OUT: one folder per run, OUT/<recipe>-<holdout|all>; SECONDS: each run's training time
# (--time-budget); DEVICE: cuda (default) or cpu; RECIPE: base, strong, strong-paste
# (default: base and strong).
# Environment: HOLDOUTS (default "0001TP 0006R0 all"; "all" trains on every frame),
# WORKERS (data-loading processes per run, default 2), BATCH (default 16) and LR (default
# 3e-4): an accelerator is bound by per-step overheads at batch 16, so larger batches get more
# samples through the same minutes there; PRECISION (default --no-amp, float32; --amp for
# bfloat16 autocast, which on a CPU with bfloat16 products takes a step in 0.6 of the time).
set -euo pipefail
data=$1 out=$2 seconds=$3 device=${4:-cuda}
shift $(( $# < 4 ? $# : 4 ))
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(base strong)
python=${PYTHON:-python3}

common=(--model configs/default_model/config.json --data "$data" --panoptic
        --train-split train,val --eval-split train,val --group-by '^([^_]+)_'
        --batch-size "${BATCH:-16}" --lr "${LR:-3e-4}" --backbone-lr-mult 1.0 --weight-decay 0.05 --warmup-steps 100
        --poly-power 0.9 --clip-grad 1.0 --semantic-aux-weight 2.0 --time-budget "$seconds"
        --eval-every 1000 --checkpoint-every 500 --log-every 20 --num-workers "${WORKERS:-2}" --no-progress
        --device "$device" "${PRECISION:---no-amp}" --seed 2)
declare -A flags=(
    [base]="--crop-size 256 --scale-range 0.55 1.0"
    [strong]="--crop-size 256 352 --scale-range 0.5 1.25 --strong-augment --ema-decay 0.999 --class-balance"
    [strong-paste]="--crop-size 256 352 --scale-range 0.5 1.25 --strong-augment --ema-decay 0.999 --class-balance --copy-paste pole,sign,fence,pedestrian,bicyclist"
)
for recipe in "${recipes[@]}"; do
    [ -n "${flags[$recipe]+set}" ] || { echo "unknown recipe $recipe (known: ${!flags[*]})" >&2; exit 2; }
done
pids=()
for recipe in "${recipes[@]}"; do
    for holdout in ${HOLDOUTS:-0001TP 0006R0 all}; do
        run=$out/$recipe-$holdout
        mkdir -p "$run"
        if [ "$holdout" = all ]; then
            select=(--eval-every 0)  # every frame, no evaluation: the shipped model is the last (averaged) weights
        else
            select=(--holdout-groups "$holdout")
        fi
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=1 "$python" -m omniseg train "${common[@]}" ${flags[$recipe]} "${select[@]}" \
            --out "$run" > "$run/train.txt" 2>&1 &
        pids+=($!)
    done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status

#!/usr/bin/env bash
# The measurements that need a GPU, as named runs that share one time limit.
#
#   bash bench/gpu.sh stage            # here, once: into $STAGE (default gpu-stage/, git-ignored, ~34 MB) the
#                                      # official pyautoattack's .py files, CIFAR-10's test_batch and the
#                                      # validation split alone (training images 0..1023, as a one-batch data_batch_1)
#   bash bench/gpu.sh run NAME...      # on the GPU machine, with the working tree and $STAGE copied there
#   bash bench/gpu.sh list             # the runs and their commands
#
# Each run writes $OUTPUT/<name>.json (the report, with its command) and $OUTPUT/<name>.log. Settings:
#   OUTPUT  the folder the reports, logs and models go to (default gpu-out)
#   STAGE   the staging folder (default gpu-stage); a report found there as <name>.json is continued by its run
#           (a run stopped at the time limit keeps its finished batches: copy its report into STAGE and run it again)
#   LIMIT   seconds for all runs of one call (default 570): a run still going then is stopped, its report kept
#   MODEL   the model file the evaluation runs read (default models/default_model.pth)
#   N       test images of the *_test runs (default all 10,000)
#   EBS     evaluation batch (default 1000: one batch of 1,000 beat two of 512 for AutoAttack on an H200)
#   GRID    alpha grid of recipe_calibrate (default 0,0.1,0.2,0.3,0.35,0.4)
#   RECIPE  the new recipe's model file (default $OUTPUT/recipe.pth, written by recipe_train)
#   BUDGET  recipe_train's --time-budget in minutes (default 8.5, so that the whole run fits in LIMIT)
#   DATA    data folder (default $STAGE/c10; recipe_train needs the whole training split: point DATA at it)
#   EXTRA   flags appended to every model.py command, e.g. EXTRA="--n-eval 2" for a dry run on the CPU
# A dry run on the CPU: `N=2 EBS=2 LIMIT=3600 bash bench/gpu.sh run apgd_linf_test` (docs/gpu.md has them all).
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${STAGE:-gpu-stage}"
outdir="${OUTPUT:-gpu-out}"
model="${MODEL:-models/default_model.pth}"
data="${DATA:-$stage/c10}"
recipe_model="${RECIPE:-$outdir/recipe.pth}"
n_flag=(); [ -n "${N:-}" ] && n_flag=(--n-eval "$N")
common=(--split test --eval-batch-size "${EBS:-1000}" --data-dir "$data")
recipe=(--force-train --time-budget "${BUDGET:-8.5}" --trades 6 --awp 5e-3 --awp-warmup 5 --train-steps 2
        --train-step-size 8/255 --eps-ramp 1 --ema 0.995 --ema-start 0.75 --select-from 0.5)

command_of() {       # name -> the command (model.py runs get --report $outdir/<name>.json)
    case "$1" in
    # the adaptive evaluation of the committed model on the whole test set (PGD-20: ~10 s per 10,000 on an H200)
    apgd_linf_test)     echo ./model.py --model-file "$model" --eval natural,pgd-linf,apgd-linf "${n_flag[@]}" "${common[@]}" ;;
    apgd_l2_test)       echo ./model.py --model-file "$model" --eval pgd-l2,apgd-l2 "${n_flag[@]}" "${common[@]}" ;;
    # README's AutoAttack figures again, in true float32 (the reports in results/ ran in TF32)
    aa_linf_float32)    echo ./model.py --model-file "$model" --alpha 0 --eval aa-linf --n-eval 1000 "${common[@]}" ;;
    aa_l2_float32)      echo ./model.py --model-file "$model" --alpha 0 --eval aa-l2 --n-eval 1000 "${common[@]}" ;;
    # the stronger recipe: train, calibrate, evaluate, and its speed
    recipe_train)       echo ./model.py "${recipe[@]}" --calibrate --alpha-criterion bpda --alpha-grid 0 \
                             --model-file "$recipe_model" --eval natural --split test --data-dir "$data" ;;
    recipe_calibrate)   echo ./model.py --calibrate --reuse-statistics --model-file "$recipe_model" --alpha-grid \
                             "${GRID:-0,0.1,0.2,0.3,0.35,0.4}" --eval natural "${common[@]}" --split val ;;
    recipe_test)        echo ./model.py --model-file "$recipe_model" --eval natural,pgd-linf,bpda-linf,apgd-linf \
                             "${n_flag[@]}" "${common[@]}" ;;
    recipe_aa)          echo ./model.py --model-file "$recipe_model" --alpha 0 --eval aa-linf --n-eval 1000 "${common[@]}" ;;
    throughput)         echo python3 bench/throughput.py ;;
    throughput_compile) echo python3 bench/throughput.py --compile --warmup 30 ;;
    *) return 1 ;;
    esac
}
all_runs="apgd_linf_test apgd_l2_test aa_linf_float32 aa_l2_float32 recipe_train recipe_calibrate recipe_test recipe_aa throughput throughput_compile"

case "${1:-}" in
stage)
    src="${CIFAR10_DIR:-./data}/cifar-10-batches-py"
    [ -f "$src/test_batch" ] || { echo "no $src/test_batch: set CIFAR10_DIR to the folder that holds cifar-10-batches-py" >&2; exit 2; }
    mkdir -p "$stage/c10/cifar-10-batches-py"
    cp "$src/test_batch" "$stage/c10/cifar-10-batches-py/"
    python3 - "$src/data_batch_1" "$stage/c10/cifar-10-batches-py/data_batch_1" <<'PY'
import pickle, sys
with open(sys.argv[1], "rb") as f:
    batch = pickle.load(f, encoding="bytes")
val = {b"data": batch[b"data"][:1024], b"labels": batch[b"labels"][:1024]}   # the validation split only
with open(sys.argv[2], "wb") as f:
    pickle.dump(val, f)
PY
    # The wheel is 45 MB because of an example model; the package itself is a few .py files.
    tmp=$(mktemp -d)
    pip download --no-deps pyautoattack==0.2.0 -d "$tmp" >/dev/null
    python3 -m zipfile -e "$tmp"/pyautoattack-0.2.0-py3-none-any.whl "$tmp/unzipped"
    rm -rf "$stage/pyautoattack"
    mkdir -p "$stage/pyautoattack"
    cp "$tmp"/unzipped/pyautoattack/*.py "$stage/pyautoattack/"
    rm -rf "$tmp"
    du -sh "$stage"
    ;;
list)
    for name in $all_runs; do echo "$name: $(command_of "$name")"; done
    ;;
run)
    shift
    runs="${*:-}"
    [ -n "$runs" ] || { echo "name the runs: bash bench/gpu.sh run NAME... (bash bench/gpu.sh list shows them)" >&2; exit 2; }
    for name in $runs; do
        command_of "$name" >/dev/null || { echo "unknown run '$name': choose from" $all_runs >&2; exit 2; }
    done
    [ -d "$stage/pyautoattack" ] || python3 -c "import pyautoattack" 2>/dev/null || {
        echo "no pyautoattack here and nothing staged in $stage: run 'bash bench/gpu.sh stage' first" >&2; exit 2; }
    mkdir -p "$outdir"
    export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    end=$(( $(date +%s) + ${LIMIT:-570} ))
    status=0
    for name in $runs; do
        left=$(( end - $(date +%s) ))
        if [ "$left" -le 0 ]; then echo "== $name: no time left, skipped"; status=1; continue; fi
        read -r -a cmd <<<"$(command_of "$name")"
        if [ "${cmd[0]}" = ./model.py ]; then
            read -r -a extra_flags <<<"${EXTRA:-}"
            cmd+=("${extra_flags[@]}" --report "$outdir/$name.json")
            # a report brought back from an earlier call is continued: its finished rows and batches are kept
            [ -f "$stage/$name.json" ] && [ ! -f "$outdir/$name.json" ] && cp "$stage/$name.json" "$outdir/$name.json"
        fi
        echo "== $name (at most $left s): ${cmd[*]}"
        timeout -k 10 "$left" "${cmd[@]}" 2>&1 | tee "$outdir/$name.log" || status=1
        if [ "$name" = recipe_train ] && [ ! -f "$recipe_model" ] && [ -f "$recipe_model.ckpt" ]; then
            # stopped while training: the checkpoint (fp32 weights, momentum, EMA) is too large to bring back
            python3 bench/rescue.py "$recipe_model.ckpt" "$outdir/recipe_partial.pth" || status=1
        fi
    done
    exit $status
    ;;
*)
    echo "usage: bash bench/gpu.sh stage | list | run NAME..." >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# GPU runs of this project as named steps that share one deadline (the device allows 10 minutes a call).
#
#   bash bench/gpu.sh stage            # here: into .device-extra/ (git-ignored, ~34 MB): pyautoattack's .py
#                                      # files, CIFAR-10's test_batch, and the validation split alone (training
#                                      # images 0..1023, as a one-batch data_batch_1)
#   bash bench/gpu.sh run NAME...      # on the GPU machine, carry=[".device-extra"]; or RUNS="NAME ..."
#   bash bench/gpu.sh list             # the runs and their commands
#
# Each run writes $OUT/<name>.json (the report, with its command) and $OUT/<name>.log (default $OUT: ./gpu-out).
#   LIMIT  seconds for all runs of the call (default 570): a run still going then is stopped; the reports
#          already written come back
#   MODEL  the model file the evaluation runs read (default models/default_model.pth; after a calibrate run,
#          /tmp/gpu-models/<file> holds the recalibrated copy while the machine stays warm)
#   N      test images of the *_test runs (default all 10,000)
#   EBS    evaluation batch (default 1000: one batch of 1,000 beat two of 512 in AutoAttack on the H200)
#   GRID   alpha grid of the calibrate runs (default 0,0.1,0.2,0.3,0.35,0.4)
#   RECIPE the new recipe's model file (default /tmp/gpu-models/recipe.pth, written by recipe_train; in a later
#          allocation carry it, e.g. as .device-extra/recipe.pth, and pass RECIPE=.device-extra/recipe.pth)
#   BUDGET recipe_train's --time-budget in minutes (default 8.5: the call's 570 s also hold the start, the
#          statistics pass, the test-set check and the save; a run killed at the deadline while training
#          brings back only recipe_partial.pth, from its checkpoint (bench/rescue.py), which is too large)
#   RESUME set (RESUME=1): a model.py run whose report an earlier call brought back, and which was carried
#          as $extra/<name>.json, continues it (--resume: finished rows kept, a cut APGD row continued);
#          the run must read the same model file (MODEL) as the one that wrote it
#   EXTRA  flags appended to every model.py command, for a dry run on the CPU, e.g.
#          EXTRA="--n-eval 4" or, for recipe_train, EXTRA="--arch 10-1 --n-train 1024"
#   DATA   data folder (default .device-extra/c10; the recipe runs need the whole training split:
#          ../shared/device/stage-cifar10 puts it in /tmp/cifar10)
# On the CPU, `N=2 EBS=2 LIMIT=3600 bash bench/gpu.sh run apgd_linf_test` checks a path end to end (see EXTRA).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=.device-extra
out="${OUT:-gpu-out}"
model="${MODEL:-models/default_model.pth}"
data="${DATA:-$extra/c10}"
n_flag=(); [ -n "${N:-}" ] && n_flag=(--n-eval "$N")
common=(--split test --eval-batch-size "${EBS:-1000}" --data-dir "$data")
grid="${GRID:-0,0.1,0.2,0.3,0.35,0.4}"
recipe=(--force-train --time-budget "${BUDGET:-8.5}" --trades 6 --awp 5e-3 --awp-warmup 5 --train-steps 2
        --train-step-size 8/255 --eps-ramp 1 --ema 0.995 --ema-start 0.75 --select-from 0.5)

recipe_model="${RECIPE:-/tmp/gpu-models/recipe.pth}"

# name -> the command (model.py runs get --report $OUT/<name>.json); grouped by issue, in order of importance
command_of() {
    case "$1" in
    # issue 11: the adaptive evaluation of the committed model
    adaptive_calibrate)  echo ./model.py --calibrate --reuse-statistics --model-file /tmp/gpu-models/default_model.pth \
                              --alpha-grid "$grid" --eval natural "${common[@]}" --split val ;;
    # (PGD-20 rows: about 10 s per 10,000 images on the H200; at alpha 0 a bpda-* row would repeat them)
    apgd_linf_test)      echo ./model.py --model-file "$model" --eval natural,pgd-linf,apgd-linf "${n_flag[@]}" "${common[@]}" ;;
    apgd_l2_test)        echo ./model.py --model-file "$model" --eval pgd-l2,apgd-l2 "${n_flag[@]}" "${common[@]}" ;;
    apgd_test1000_alpha035) echo ./model.py --model-file "$model" --alpha 0.35 --eval apgd-linf,apgd-l2 --n-eval 1000 \
                              "${common[@]}" ;;
    apgd_test1000_alpha0)   echo ./model.py --model-file "$model" --alpha 0 --eval apgd-linf,apgd-l2 --n-eval 1000 \
                              "${common[@]}" ;;
    # issue 12: the new recipe; recipe_train needs the training split (../shared/device/stage-cifar10)
    throughput)          echo python3 bench/throughput.py ;;
    throughput_compile)  echo python3 bench/throughput.py --compile --warmup 30 ;;
    recipe_train)        echo ./model.py "${recipe[@]}" --calibrate --alpha-criterion bpda --alpha-grid 0 \
                              --model-file "$recipe_model" --eval natural --split test --data-dir "${DATA:-/tmp/cifar10}" ;;
    recipe_calibrate)    echo ./model.py --calibrate --reuse-statistics --model-file "$recipe_model" --alpha-grid "$grid" \
                              --eval natural "${common[@]}" --split val ;;
    recipe_test)         echo ./model.py --model-file "$recipe_model" --eval natural,pgd-linf,bpda-linf,apgd-linf \
                              "${n_flag[@]}" "${common[@]}" ;;
    recipe_aa_alpha0)    echo ./model.py --model-file "$recipe_model" --alpha 0 --eval aa-linf --n-eval 1000 "${common[@]}" ;;
    # issue 6: standard AutoAttack of the committed model
    aa_linf_alpha0)      echo ./model.py --model-file "$model" --eval aa-linf --alpha 0 --n-eval 1000 "${common[@]}" ;;
    aa_l2_alpha035)      echo ./model.py --model-file "$model" --eval aa-l2 --n-eval 1000 "${common[@]}" ;;
    aa_l2_alpha0)        echo ./model.py --model-file "$model" --eval aa-l2 --alpha 0 --n-eval 1000 "${common[@]}" ;;
    *) return 1 ;;
    esac
}
all_runs="adaptive_calibrate apgd_linf_test apgd_l2_test apgd_test1000_alpha035 apgd_test1000_alpha0
          throughput throughput_compile recipe_train recipe_calibrate recipe_test recipe_aa_alpha0
          aa_linf_alpha0 aa_l2_alpha035 aa_l2_alpha0"

case "${1:-}" in
stage)
    src="${CIFAR10_DIR:-../shared/cifar10}/cifar-10-batches-py"
    [ -f "$src/test_batch" ] || { echo "no $src/test_batch: set CIFAR10_DIR to the folder that holds cifar-10-batches-py" >&2; exit 2; }
    mkdir -p "$extra/c10/cifar-10-batches-py"
    cp "$src/test_batch" "$extra/c10/cifar-10-batches-py/"
    python3 - "$src/data_batch_1" "$extra/c10/cifar-10-batches-py/data_batch_1" <<'PY'
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
    rm -rf "$extra/pyautoattack"
    mkdir -p "$extra/pyautoattack"
    cp "$tmp"/unzipped/pyautoattack/*.py "$extra/pyautoattack/"
    rm -rf "$tmp"
    du -sh "$extra"
    ;;
list)
    for name in $all_runs; do echo "$name: $(command_of "$name")"; done
    ;;
run)
    shift
    runs="${*:-${RUNS:-}}"
    [ -n "$runs" ] || { echo "name the runs: bash bench/gpu.sh run NAME... (bash bench/gpu.sh list shows them)" >&2; exit 2; }
    for name in $runs; do
        command_of "$name" >/dev/null || { echo "unknown run '$name': choose from" $all_runs >&2; exit 2; }
    done
    [ -d "$extra/pyautoattack" ] || {
        echo "nothing staged in $extra: run 'bash bench/gpu.sh stage' first (and carry $extra)" >&2; exit 2; }
    mkdir -p "$out" /tmp/gpu-models
    # a calibrate run works on a copy; later runs of the same warm machine can read it (MODEL=...)
    [ -f /tmp/gpu-models/default_model.pth ] || cp models/default_model.pth /tmp/gpu-models/
    export PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    end=$(( $(date +%s) + ${LIMIT:-570} ))
    status=0
    for name in $runs; do
        left=$(( end - $(date +%s) ))
        if [ "$left" -le 0 ]; then echo "== $name: no time left, skipped"; status=1; continue; fi
        read -r -a cmd <<<"$(command_of "$name")"
        if [ "${cmd[0]}" = ./model.py ]; then
            read -r -a extra_flags <<<"${EXTRA:-}"
            cmd+=("${extra_flags[@]}" --report "$out/$name.json")
            if [ -n "${RESUME:-}" ] && [ -f "$extra/$name.json" ]; then
                cp "$extra/$name.json" "$out/$name.json"
                cmd+=(--resume)
            fi
        fi
        echo "== $name (at most $left s): ${cmd[*]}"
        timeout -k 10 "$left" "${cmd[@]}" 2>&1 | tee "$out/$name.log" || status=1
        case "$name" in     # the models these runs wrote come back too
            adaptive_calibrate) cp /tmp/gpu-models/default_model.pth "$out/" ;;
            recipe_train|recipe_calibrate)
                if [ -f "$recipe_model" ]; then
                    cp "$recipe_model" "$out/recipe.pth"
                elif [ -f "$recipe_model.ckpt" ]; then      # cut off while training: the checkpoint is too
                    python3 bench/rescue.py "$recipe_model.ckpt" "$out/recipe_partial.pth" || status=1   # large
                fi ;;
        esac
    done
    exit $status
    ;;
*)
    echo "usage: bash bench/gpu.sh stage | list | run NAME..." >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Standard AutoAttack on the committed model, as one GPU call (issue 6). Two steps:
#
#   bash bench/autoattack_gpu.sh stage     # here: pyautoattack's .py files and CIFAR-10's test_batch
#                                          # into .device-extra/ (git-ignored, ~30 MB)
#   bash bench/autoattack_gpu.sh run       # on the GPU machine, with carry=[".device-extra"]
#
# `run` makes three reports in $OUT (default ./aa-out), in order of importance: L-inf at alpha 0
# (MeanSparse off), L2 at the committed alpha (under BPDA), L2 at alpha 0. They are
# results/aa_linf_alpha0.json, aa_l2_alpha035.json and aa_l2_alpha0.json; the committed alpha's L-inf
# figure, results/aa_linf_alpha035.json, came from model.py with --eval aa-linf and no --alpha.
# The runs share one deadline, LIMIT seconds (default 570, under the device's 10 minutes per command): a
# run still going then is stopped, and the reports already written come back.
#   N     number of test images (default 1000)
#   BS    batch size (default 1000): one batch of 1,000 was faster than two of 512 (L2 at alpha 0 on the
#         H200: FAB-T done after 91.5 s instead of 112.9 s)
#   RUNS  the runs to make, by name (default all three), e.g. RUNS=aa_l2_alpha0 to redo one the deadline
#         stopped
# On the CPU, `N=2 LIMIT=3600 bash bench/autoattack_gpu.sh run` checks the whole path.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=.device-extra

case "${1:-}" in
stage)
    src="${CIFAR10_DIR:-../shared/cifar10}/cifar-10-batches-py/test_batch"
    [ -f "$src" ] || { echo "no $src: set CIFAR10_DIR to the folder that holds cifar-10-batches-py" >&2; exit 2; }
    mkdir -p "$extra/c10/cifar-10-batches-py"
    cp "$src" "$extra/c10/cifar-10-batches-py/"
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
run)
    [ -d "$extra/pyautoattack" ] && [ -f "$extra/c10/cifar-10-batches-py/test_batch" ] || {
        echo "nothing staged in $extra: run 'bash bench/autoattack_gpu.sh stage' first (and carry $extra)" >&2
        exit 2
    }
    out="${OUT:-aa-out}"
    mkdir -p "$out"
    export PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    end=$(( $(date +%s) + ${LIMIT:-570} ))
    status=0
    all_runs="aa_linf_alpha0 aa_l2_alpha035 aa_l2_alpha0"
    runs="${RUNS:-$all_runs}"
    for name in $runs; do
        [[ " $all_runs " == *" $name "* ]] || { echo "unknown run '$name' in RUNS: choose from $all_runs" >&2; exit 2; }
    done
    for spec in "aa-linf 0 aa_linf_alpha0" "aa-l2 - aa_l2_alpha035" "aa-l2 0 aa_l2_alpha0"; do
        read -r attack alpha name <<<"$spec"
        [[ " $runs " == *" $name "* ]] || continue
        alpha_flag=()
        [ "$alpha" = "-" ] || alpha_flag=(--alpha "$alpha")
        left=$(( end - $(date +%s) ))
        if [ "$left" -le 0 ]; then echo "== $name: no time left, skipped"; status=1; continue; fi
        echo "== $name (at most $left s)"
        timeout "$left" ./model.py --eval "$attack" "${alpha_flag[@]}" --n-eval "${N:-1000}" \
            --batch-size "${BS:-1000}" --split test --data-dir "$extra/c10" --report "$out/$name.json" 2>&1 \
            | tee "$out/$name.log" || status=1
    done
    exit $status
    ;;
*)
    echo "usage: bash bench/autoattack_gpu.sh stage|run" >&2
    exit 2
    ;;
esac

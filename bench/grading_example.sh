#!/usr/bin/env bash
# The worked example of docs/grading.md: three projects graded in one command, then two with --sanity.
#
#   bash bench/grading_example.sh [WORK]     # WORK: a scratch folder (default a new temporary one)
#
# In WORK it makes the projects: robust-cifar10 (a link to this repository), quantised (a copy whose Net
# rounds its input to 3 bits, so that its input gradient is zero) and broken (a model.py whose import
# fails). It writes results/grading_example.json, results/grading_sanity_example.json and
# docs/grading.png. Both commands exit 1, as they should: a project fails, checks fire.
# About 4 + 12 minutes on a 2-core CPU.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work/quantised/models" "$work/broken"
cd "$work"
ln -sfn "$repo" robust-cifar10
cp "$repo/model.py" quantised/ && cp "$repo/models/default_model.pth" quantised/models/
cat >> quantised/model.py <<'EOF'


class Net(Net):
    """The committed model behind a 3-bit input quantiser: its gradient is zero almost everywhere."""
    def forward(self, x):
        return super().forward(torch.round(x * 8) / 8)
EOF
echo "import nonexistent_package" > broken/model.py
robust-cifar10/model.py --project robust-cifar10 --project quantised --project broken \
    --eval natural,pgd-linf,pgd-l2 --n-eval 200 --report grades.json --plot grades.png
robust-cifar10/model.py --project robust-cifar10 --project quantised --eval natural,pgd-linf --n-eval 64 \
    --sanity --report sanity.json
cp grades.json "$repo/results/grading_example.json" && cp sanity.json "$repo/results/grading_sanity_example.json" \
    && cp grades.png "$repo/docs/grading.png" && echo "the projects and their reports are in $work"

#!/usr/bin/env python3
"""Turn an unfinished training run's checkpoint into a model file.

    python3 bench/rescue.py models/x.pth.ckpt /tmp/x_partial.pth

The model file holds the best weights the run's APGD checks saw (--select-from), else the weights of its
last finished epoch, with the run's history and `"complete": false` in its metadata. A GPU call cut at its
deadline brings this back (11 MiB) where the checkpoint (fp32 weights, momentum, EMA, best weights) is too
large to; `bench/gpu.sh` does it after a `recipe_train` that did not finish. The checkpoint stays, so the
run can still be resumed where it is. A file already at MODEL_FILE is kept as MODEL_FILE.prev; the committed
model (what Net() loads) is refused. Calibrate the file before use: `./model.py --calibrate --model-file`.
Exit status: 0, or 2 for bad input.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import model as M   # noqa: E402


def main(argv):
    if len(argv) != 2:
        print("usage: python3 bench/rescue.py CHECKPOINT MODEL_FILE", file=sys.stderr)
        return 2
    checkpoint, model_file = argv
    try:
        if M._same_file(checkpoint, model_file):
            raise M.UserError(f"{model_file} is the checkpoint itself: give another name")
        if M.is_committed_model(model_file):    # Net() and the grader would load an unfinished, uncalibrated model
            raise M.UserError(f"{model_file} is the file Net() loads: write the rescued model elsewhere, then "
                              f"calibrate and evaluate it before it replaces the committed one")
        M._check_writable("MODEL_FILE", model_file)
        with M.write_lock(model_file, "MODEL_FILE"):     # not while a run is writing the same file
            M.rescue_checkpoint(checkpoint, model_file)
    except M.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

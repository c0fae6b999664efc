#!/usr/bin/env python3
"""Turn an unfinished training run's checkpoint into a model file.

    python3 bench/rescue.py models/x.pth.ckpt /tmp/x_partial.pth

The model file holds the best weights the run's APGD checks saw (--select-from), else the weights of its
last finished epoch, with the run's history and `"complete": false` in its metadata (near the end of a
one-cycle schedule the weights are close to annealed, earlier they are not). A run stopped before its end
on a machine whose files come back only if small brings back this (11 MiB) where the checkpoint (fp32
weights, momentum, EMA, best weights) is too large. The checkpoint stays, so the run can still be resumed.
A file already at MODEL_FILE is kept as MODEL_FILE.prev; the committed model (what Net() loads) is
refused. Calibrate the file before use: `./model.py --calibrate --model-file MODEL_FILE`.
Exit status: 0, or 2 for bad input.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import model as M   # noqa: E402


def rescue(checkpoint_path, model_path, log=print):
    """Write the checkpoint's weights (the best the APGD checks saw, else the last epoch's) as a model file."""
    ckpt = M.read_checkpoint(checkpoint_path)
    model, best = M.build_model(ckpt["config"]["arch"]), ckpt["best"]
    try:
        model.load_state_dict(ckpt["best_state"] if best else ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise M.UserError(f"{checkpoint_path}: its weights do not fit a {ckpt['config']['arch']} "
                          f"({e.__class__.__name__})") from None
    weights = f"{best['weights']} weights of epoch {best['epoch']}" if best else f"weights of epoch {ckpt['epoch']}"
    info = {"complete": False, "epochs": ckpt["epoch"], "planned_epochs": ckpt["total_epochs"],
            "config": ckpt["config"], "history": ckpt["history"], "weights": weights,
            "rescued_from": os.path.abspath(checkpoint_path), **({"selected": best} if best else {})}
    if os.path.isfile(model_path):
        M.keep_previous(model_path, log)     # a wrong name loses nothing
    model.eval().save(model_path, {"training": info})
    log(f"wrote {model_path}: the {weights} of an unfinished run ({ckpt['epoch']} of {ckpt['total_epochs']} epochs)")
    return model


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
        M.check_writable("MODEL_FILE", model_file)
        with M.write_lock(model_file, "MODEL_FILE"):     # not while a run is writing the same file
            rescue(checkpoint, model_file)
    except M.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`cxr evaluate RUN_DIR [RUN_DIR ...]`: metrics, calibration, plots and a comparison table (see training/evaluate.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folder(s) from `cxr train`; a folder from `--arch all` means each run inside it",
    )
    parser.add_argument(
        "--data", default=None, help="image folder, if it moved since training (paths in split.csv are relative)"
    )
    parser.add_argument(
        "--ensemble", action="store_true", help="also evaluate the mean of the runs' calibrated probabilities"
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="accuracy among answered cases the operating point keeps (default 0.95); below it: indeterminate",
    )
    parser.add_argument(
        "--table", default=None, help="where to write the markdown comparison (default: comparison.md beside the runs)"
    )


def expand_runs(paths: list[str]):
    """Run folders: each path that has config.json, else its sub-folders that do."""
    from pathlib import Path

    from training.runs import RunDir

    runs = []
    for p in map(Path, paths):
        if RunDir(p).is_run():
            runs.append(p)
        else:
            inside = sorted(d for d in p.iterdir() if RunDir(d).is_run()) if p.is_dir() else []
            if not inside:
                raise SystemExit(f"{p}: not a training run (no config.json) and no runs inside it")
            runs.extend(inside)
    return runs


def _gate_line(m: dict) -> str:
    p, gate = m["operating_point"], m.get("input_gate")
    text = (
        f"operating point p >= {p['min_top_probability']:.3f}: coverage {p['coverage']:.3f} at accuracy "
        f"{p['accuracy_answered']:.3f}"
    )
    return text + (f"; input gate refuses {gate['val_refused']:.3f} of validation" if gate else "; no input gate")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from training.evaluate import comparison_table, evaluate_ensemble, evaluate_run
    from training.train import setup_logging

    runs = expand_runs(args.runs)
    # where shared outputs go (comparison.md, ensemble/): the run itself, or the folder that holds the runs
    home = runs[0] if len(runs) == 1 else Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    setup_logging(home)
    results = []
    for r in runs:
        try:
            m = evaluate_run(r, args.data, target_accuracy=args.target_accuracy)
        except FileNotFoundError as exc:
            print(f"cxr evaluate: {exc}")
            return 2
        results.append(m)
        print(
            f"{m['model']}: accuracy {m['accuracy']:.3f}, macro AUC {m['macro_auc']:.3f}, macro F1 {m['macro_f1']:.3f}, "
            f"ECE {m['ece_before']:.3f} -> {m['ece_after_cross_fitted']:.3f} (T={m['temperature']:.2f}); "
            + ", ".join(f"{s} {v['accuracy']:.3f} (n={v['n']})" for s, v in m["per_source"].items())
            + "; "
            + _gate_line(m)
        )
        if "consistent_subset" in m:
            sub = m["consistent_subset"]
            print(
                f"  radiologist-consistent subset (n={sub['n']}, {sub['excluded']} contradicted left out): accuracy "
                f"{sub['accuracy']:.3f}, macro AUC {sub['macro_auc']:.3f}; "
                + ", ".join(f"{s} {v['accuracy']:.3f} (n={v['n']})" for s, v in sub["per_source"].items())
            )
    if args.ensemble:
        m = evaluate_ensemble(runs, home / "ensemble", args.data, target_accuracy=args.target_accuracy)
        results.append(m)
        print(
            f"ensemble: accuracy {m['accuracy']:.3f}, macro AUC {m['macro_auc']:.3f}, macro F1 {m['macro_f1']:.3f}; "
            + _gate_line(m)
        )
    table = comparison_table(results)
    if any(m.get("synthetic_demo") for m in results):
        table = "**SYNTHETIC DEMO DATA (phantoms): not a medical result.**\n\n" + table
    out = Path(args.table) if args.table else home / "comparison.md"
    out.write_text(table)
    print(table)
    print(f"table written to {out}; metrics.json and plots in each run folder. Not for clinical use.")
    return 0

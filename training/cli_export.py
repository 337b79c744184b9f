"""`cxr export RUN_DIR --repository DIR [--name NAME]`, or `cxr export --ensemble RUN_A RUN_B ... --repository DIR`.

Packages what `cxr evaluate` fitted (temperature, operating point, input gate); it evaluates nothing itself."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folder(s); a folder from `--arch all` means each run inside it"
    )
    parser.add_argument(
        "--repository", required=True, help="model repository folder (Triton layout); created if absent"
    )
    parser.add_argument(
        "--name", default=None, help="model name (default: the architecture; 'ensemble' with --ensemble)"
    )
    parser.add_argument("--data", default=None, help="image folder, if it moved since training (for the parity check)")
    parser.add_argument(
        "--ensemble", action="store_true", help="export the runs as ONE model averaging their probabilities"
    )
    parser.add_argument(
        "--evaluation",
        default=None,
        help="with --ensemble: the folder `cxr evaluate --ensemble` wrote (default: ensemble/ beside the runs)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="size a new model's CPU serving shape (instance_group count x intra_op_thread_count in config.pbtxt) "
        "for this many CPUs, e.g. the inference pod's CPU limit (default: the CPUs this machine lets us use)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cxr.repository import RepositoryError
    from training.cli_evaluate import expand_runs
    from training.export import ExportError, export_ensemble, export_run
    from training.train import setup_logging

    runs = expand_runs(args.runs)
    repo = Path(args.repository)
    repo.mkdir(parents=True, exist_ok=True)
    setup_logging(runs[0])
    if args.ensemble and len(runs) < 2:
        raise SystemExit("--ensemble needs at least two runs")
    if args.name and len(runs) > 1 and not args.ensemble:
        raise SystemExit("--name names one model: give one run (or use --ensemble)")
    try:
        if args.ensemble:
            print(export_ensemble(runs, repo, args.name or "ensemble", args.data, args.evaluation, args.cpus))
        else:
            for r in runs:
                print(export_run(r, repo, args.name, args.data, args.cpus))
    except (ExportError, RepositoryError, FileNotFoundError) as exc:
        print(f"export failed, nothing written for this model: {exc}")
        return 1
    return 0

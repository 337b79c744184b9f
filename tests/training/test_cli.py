"""The training subcommands end to end through the `cxr` entry point: demo-data -> train -> evaluate -> export."""

from __future__ import annotations

import json

from cxr import repository
from cxr.cli import main
from training.data import SYNTHETIC_MARKER, discover
from training.demo_data import generate


def test_demo_data_phantoms_train_to_a_labelled_synthetic_model(tmp_path):
    data = tmp_path / "phantoms"
    assert main(["demo-data", "--out", str(data), "--per-class", "30", "--size", "96"]) == 0
    assert (data / SYNTHETIC_MARKER).is_file() and "not a medical model" in (data / "README.md").read_text()
    found = discover(data, ["Normal", "Lung_Opacity", "Viral Pneumonia"])
    assert found.synthetic and len(found.samples) == 90 and {s.source_origin for s in found.samples} == {"synthetic"}
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--arch",
                "custom_cnn",
                "--out",
                str(run),
                "--epochs",
                "6",
                "--image-size",
                "64",
                "--batch-size",
                "16",
                "--lr",
                "3e-3",
            ]
        )
        == 0
    )
    assert "SYNTHETIC DEMO" in (run / "train.log").read_text()
    assert main(["evaluate", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["synthetic_demo"] is True
    assert metrics["accuracy"] >= 0.8  # the classes are visibly different: a short run separates them
    assert "SYNTHETIC DEMO" in (run / "comparison.md").read_text()
    repo = tmp_path / "repo"
    assert main(["export", str(run), "--repository", str(repo)]) == 0
    config = repository.read_config(repo / "custom_cnn")
    assert config.parameters["cxr.synthetic_demo"].string_value == "true"
    card = repository.read_model_card(repo / "custom_cnn" / "1")
    assert card["synthetic_demo"] is True and "SYNTHETIC DEMO" in card["intended_use"]


def test_demo_data_is_deterministic(tmp_path):
    generate(tmp_path / "a", per_class=2, size=64)
    generate(tmp_path / "b", per_class=2, size=64)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_evaluate_reports_everything_and_compares_runs(trained_repository, capsys):
    runs = trained_repository.parent / "runs"
    members = [str(runs / n) for n in ("custom_cnn", "mobilenet", "resnet50")]
    table_path = runs / "table.md"
    assert main(["evaluate", *members, "--ensemble", "--table", str(table_path)]) == 0
    for n in ("custom_cnn", "mobilenet", "resnet50"):
        m = json.loads((runs / n / "metrics.json").read_text())
        for key in (
            "accuracy",
            "macro_auc",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "confusion_matrix",
            "classification_report",
            "ece_before",
            "ece_after",
            "ece_after_cross_fitted",
            "temperature",
            "ci95",
        ):
            assert key in m, key
        assert set(m["per_class"]) == {"Normal", "Lung_Opacity", "Viral Pneumonia"}
        assert set(m["per_source"]) == {"nih", "kermany"}
        assert sum(v["n"] for v in m["per_source"].values()) == m["n"] == sum(map(sum, m["confusion_matrix"]))
        lo, hi = m["ci95"]["accuracy"]
        assert lo <= m["accuracy"] <= hi
        for png in ("curves.png", "roc.png", "confusion_matrix.png", "reliability.png", "coverage.png"):
            assert (runs / n / png).stat().st_size > 1000
        point = m["operating_point"]
        assert 0 < point["coverage"] <= 1 and 0 <= point["min_top_probability"] <= 1
        assert m["input_gate"]["acceptance_target"] == 0.99 and m["input_gate"]["val_refused"] <= 0.1
    ensemble = json.loads((runs / "ensemble" / "metrics.json").read_text())
    assert ensemble["model"] == "ensemble" and ensemble["operating_point"]["n"] == ensemble["n"]
    assert (runs / "ensemble" / "coverage.png").stat().st_size > 1000
    table = table_path.read_text().splitlines()
    assert table[0].startswith("| Model | Val Accuracy") and "ROC AUC" in table[0] and "| F1 |" in table[0]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["custom_cnn", "mobilenet", "resnet50", "ensemble"]


def test_export_cli_reports_a_refused_export(trained_repository, tmp_path, capsys):
    run = trained_repository.parent / "runs" / "custom_cnn"
    repo = tmp_path / "repo"
    assert main(["export", str(run), "--repository", str(repo), "--name", "m"]) == 0
    (repo / "m" / "labels.txt").write_text("a\nb\nc\n")  # someone else's model under that name
    assert main(["export", str(run), "--repository", str(repo), "--name", "m"]) == 1
    assert "export failed" in capsys.readouterr().out
    assert repository.list_versions(repo / "m") == [1]


def test_export_cli_sizes_the_serving_shape_for_the_cpus_asked(trained_repository, tmp_path):
    """`cxr export --cpus 8`: the new config's instance_group and intra_op_thread_count are for 8 CPUs, not this
    machine's (an inference pod's CPU limit)."""
    run = trained_repository.parent / "runs" / "custom_cnn"
    assert main(["export", str(run), "--repository", str(tmp_path), "--cpus", "8"]) == 0
    config = repository.read_config(tmp_path / "custom_cnn")
    assert [g.count for g in config.instance_group] == [2]
    assert config.parameters["intra_op_thread_count"].string_value == "4"


def test_train_all_architectures_skips_unreadable_files_and_evaluates_the_folder(cxr_raw_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    for cls in ("Normal", "Lung_Opacity", "Viral Pneumonia"):
        (data / cls).mkdir(parents=True)
        for f in sorted((cxr_raw_dir / cls).glob("*.png"))[:5]:
            shutil.copy(f, data / cls / f.name)
    (data / "Normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "runs"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--arch",
                "all",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--image-size",
                "64",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["custom_cnn", "efficientnet_lite0", "mobilenet", "resnet50"]
    for run in out.iterdir():
        assert "Normal/broken.png" in (run / "skipped.csv").read_text()
        assert "Normal/broken.png" not in (run / "split.csv").read_text()
        assert "FROM SCRATCH" in (run / "train.log").read_text()
    assert main(["evaluate", str(out)]) == 0
    rows = (out / "comparison.md").read_text().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["custom_cnn", "efficientnet_lite0", "mobilenet", "resnet50"]


def test_evaluate_and_export_after_the_data_moved(trained_repository, cxr_raw_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_repository.parent / "runs" / "custom_cnn", run)
    for f in ("metrics.json", "calibration.json"):
        (run / f).unlink()
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["evaluate", str(run)]) == 2
    assert "pass --data" in capsys.readouterr().out
    # export packages what evaluate fitted, and evaluates nothing itself: an unevaluated run is refused
    assert main(["export", str(run), "--repository", str(tmp_path / "repo"), "--data", str(cxr_raw_dir)]) == 1
    assert "cxr evaluate" in capsys.readouterr().out
    assert not (tmp_path / "repo" / "custom_cnn").exists()
    assert main(["evaluate", str(run), "--data", str(cxr_raw_dir)]) == 0
    assert main(["export", str(run), "--repository", str(tmp_path / "repo"), "--data", str(cxr_raw_dir)]) == 0
    assert repository.list_versions(tmp_path / "repo" / "custom_cnn") == [1]

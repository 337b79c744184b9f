"""TrainConfig saves and loads itself, and the `cxr train` flags are generated from its fields."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from training.config import TrainConfig, add_flags, args_to_fields


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return TrainConfig(architecture="efficientnet_lite0", **args_to_fields(parser.parse_args(argv)))


def test_every_field_has_its_flag_with_the_field_description(capsys):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    flags = {a.dest: a for a in parser._actions}
    for name, field in TrainConfig.model_fields.items():
        if name in ("architecture", "synthetic_demo"):  # set by the CLI and by discovery, not by a flag of their own
            assert name not in flags
            continue
        assert name in flags, name
        assert field.description.replace("%", "%%") in flags[name].help
    assert flags["data"].required and not flags["epochs"].required


def test_flags_parse_into_the_config_and_unset_flags_keep_the_defaults(tmp_path):
    cfg = _parse(
        [
            "--data",
            str(tmp_path),
            "--extra-data",
            "a,b",
            "--extra-data",
            "c",
            "--classes",
            "Normal,Viral Pneumonia",
            "--label-policy",
            "drop_contradicted",
            "--no-hflip",
            "--fine-tune-layers",
            "10",
            "--backbone-lr",
            "3e-4",
            "--gamma",
            "0.3",
        ]
    )
    assert cfg.data == str(tmp_path.resolve()) and cfg.extra_data == [str(Path(x).resolve()) for x in "abc"]
    assert cfg.classes == ["Normal", "Viral Pneumonia"] and cfg.label_policy == "drop_contradicted"
    assert cfg.hflip is False and cfg.fine_tune_layers == 10 and cfg.backbone_lr == 3e-4 and cfg.gamma == 0.3
    assert cfg.epochs == TrainConfig.model_fields["epochs"].default and cfg.weights == "none"
    with pytest.raises(SystemExit):
        _parse(["--data", "x", "--label-policy", "relabel_everything"])
    with pytest.raises(ValidationError):
        TrainConfig(data="x", architecture="custom_cnn", no_such_setting=1)


def test_config_round_trip(tmp_path):
    cfg = _parse(["--data", str(tmp_path), "--weights", "imagenet", "--site-check-class", ""])
    assert cfg.site_check_class is None
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == cfg

"""A training run's folder, as `cxr.repository` is for model repositories: one place that knows its files.

config.json       TrainConfig (training/config.py)
split.csv         every image: class, train/val, patient, source, data folder, radiologist verdict
skipped.csv       unreadable images
data.json         counts per source and class, what label cleaning removed, the site check
pretrained.json   where pretrained weights came from (file, sha256, keys); absent when trained from scratch
train.log, history.json (one record per epoch), best.pt (kept: the best validation macro AUC), last.pt (resume)
metrics.json, calibration.json, val_logits.npy, *.png   written by `cxr evaluate`
"""

from __future__ import annotations

import json
from pathlib import Path

from training.calibrate import CALIBRATION_FILE, GATE_FILE
from training.config import TrainConfig
from training.data import SPLIT_FILE


class RunDir:
    CONFIG = "config.json"
    SPLIT = SPLIT_FILE
    SKIPPED = "skipped.csv"
    DATA = "data.json"
    PRETRAINED = "pretrained.json"
    LOG = "train.log"
    HISTORY = "history.json"
    BEST = "best.pt"
    LAST = "last.pt"
    METRICS = "metrics.json"
    CALIBRATION = CALIBRATION_FILE  # training/calibrate.py owns its content (Calibration.save / load)
    INPUT_GATE = GATE_FILE
    VAL_LOGITS = "val_logits.npy"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def is_run(self) -> bool:
        return (self.path / self.CONFIG).is_file()

    def config(self) -> TrainConfig:
        return TrainConfig.load(self.path / self.CONFIG)

    def read_json(self, name: str, default=None):
        """A JSON file of the run, or `default` when it is absent."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else default

    def write_json(self, name: str, value, indent: int = 2) -> None:
        (self.path / name).write_text(json.dumps(value, indent=indent) + "\n")

    def history(self) -> list[dict]:
        return self.read_json(self.HISTORY, [])

    def data_facts(self) -> dict:
        return self.read_json(self.DATA, {})

    def pretrained(self) -> dict | None:
        return self.read_json(self.PRETRAINED)

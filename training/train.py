"""Training: one architecture on one split, with augmentation, class balance, early stopping on validation macro AUC,
the best checkpoint kept, and resume from the last epoch.

The run folder's files: training/runs.py.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import data as D
from training.config import TrainConfig
from training.metrics import macro_auc
from training.models import backbone_blocks, build_model, set_trainable_top
from training.runs import RunDir

log = logging.getLogger("cxr.training")


def setup_logging(run_dir: Path) -> None:
    logger = logging.getLogger("cxr.training")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_cxr_run", False):
            logger.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(run_dir / RunDir.LOG), logging.StreamHandler()):
        handler.setFormatter(fmt)
        handler._cxr_run = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- data for one run ---------------------------------------------------------------------------------------------


def prepare_split(cfg: TrainConfig, run_dir: Path, facts: dict | None = None) -> tuple[D.ImageSet, D.ImageSet]:
    """Read the images and split them; a run folder that already has split.csv reuses it (resume, evaluation).
    Returns (training set after label cleaning, the whole validation split); `facts` (if given) receives what the
    label cleaning removed and the counts per class and source."""
    split_path = run_dir / RunDir.SPLIT
    roots = D.data_roots(cfg.data, cfg.extra_data)
    if split_path.is_file():
        samples, split = D.read_split(split_path, cfg.classes)
        everything, skipped = D.load_images(roots, samples, cfg.image_size, progress=True)
        keep = {(s.dataset, s.file) for s in everything.samples}
        split = [side for s, side in zip(samples, split) if (s.dataset, s.file) in keep]
    else:
        found = D.discover(
            Path(cfg.data),
            cfg.classes,
            Path(cfg.manifest) if cfg.manifest else None,
            cfg.max_per_class,
            Path(cfg.radiologist_labels) if cfg.radiologist_labels else None,
        )
        cfg.manifest = str(found.manifest) if found.manifest else None
        cfg.radiologist_labels = str(found.radiologist_labels) if found.radiologist_labels else None
        cfg.synthetic_demo = cfg.synthetic_demo or found.synthetic
        samples = list(found.samples)
        for name, root in list(roots.items())[1:]:
            extra = D.discover(root, cfg.classes, None, cfg.max_per_class, dataset=name, require_all_classes=False)
            samples += extra.samples
        everything, skipped = D.load_images(roots, samples, cfg.image_size, progress=True)
        split = D.stratified_patient_split(everything.samples, cfg.val_fraction, cfg.seed)
        if cfg.site_check_class and cfg.extra_data and cfg.site_check_class in cfg.classes:
            label = cfg.classes.index(cfg.site_check_class)
            split = D.move_patients_to_validation(
                everything.samples, split, lambda s: s.dataset != "" and s.label == label
            )
        D.write_split(split_path, everything.samples, split, cfg.classes)
        with open(run_dir / RunDir.SKIPPED, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "reason"])
            writer.writerows([[s.file, s.reason] for s in skipped])
    if skipped:
        log.warning("%d unreadable images skipped (listed in %s)", len(skipped), run_dir / RunDir.SKIPPED)
    is_val = np.array([side == "val" for side in split], dtype=bool)
    dropped = training_exclusions(cfg, everything.samples)
    if dropped.any():
        removed = Counter(cfg.classes[s.label] for s, d, v in zip(everything.samples, dropped, is_val) if d and not v)
        log.info(
            "label cleaning (%s%s): %d training images leave training: %s",
            cfg.label_policy,
            f", --exclude {Path(cfg.exclude).name}" if cfg.exclude else "",
            sum(removed.values()),
            dict(removed),
        )
    train_set, val_set = subset(everything, ~is_val & ~dropped), subset(everything, is_val)
    if facts is not None:
        removed = [s for s, d, v in zip(everything.samples, dropped, is_val) if d and not v]
        facts.update(
            {
                "label_policy": cfg.label_policy,
                "exclude": Path(cfg.exclude).name if cfg.exclude else None,
                "radiologist_labels": Path(cfg.radiologist_labels).name if cfg.radiologist_labels else None,
                "removed_from_training": dict(Counter(cfg.classes[s.label] for s in removed)),
                "extra_data": [Path(e).name for e in cfg.extra_data],
                "site_check": (
                    f"all {cfg.site_check_class} images of {', '.join(Path(e).name for e in cfg.extra_data)} "
                    "(and their patients) are in validation only"
                )
                if cfg.site_check_class and cfg.extra_data
                else None,
                "train": _counts(train_set, cfg.classes),
                "val": _counts(val_set, cfg.classes),
                "val_contradicted": int(sum(s.contradicted for s in val_set.samples)),
            }
        )
    return train_set, val_set


def _counts(images: D.ImageSet, classes: list[str]) -> dict[str, dict[str, int]]:
    """{source: {class: n}}"""
    out: dict[str, dict[str, int]] = {}
    for s in images.samples:
        by_class = out.setdefault(s.source_origin, {})
        by_class[classes[s.label]] = by_class.get(classes[s.label], 0) + 1
    return out


def training_exclusions(cfg: TrainConfig, samples: list[D.Sample]) -> np.ndarray:
    """Which samples the label policy and --exclude keep out of training (validation keeps everything)."""
    out = np.zeros(len(samples), dtype=bool)
    if cfg.label_policy == "drop_contradicted":
        if not any(s.radiologist for s in samples):
            raise FileNotFoundError(
                "--label-policy drop_contradicted needs radiologist labels: DATA/"
                f"{D.RADIOLOGIST_FILE} or --radiologist-labels CSV (columns file, rsna_verdict)"
            )
        out |= np.array([s.contradicted for s in samples], dtype=bool)
    if cfg.exclude:
        listed = read_exclusions(Path(cfg.exclude))
        out |= np.array([s.file in listed for s in samples], dtype=bool)
    return out


def read_exclusions(path: Path) -> set[str]:
    """The `file` column of an --exclude CSV (paths relative to their data folder, as in split.csv)."""
    if not path.is_file():
        raise FileNotFoundError(f"--exclude {path}: no such file")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise ValueError(f"--exclude {path}: needs a 'file' column")
        return {row["file"] for row in reader}


def subset(images: D.ImageSet, mask: np.ndarray) -> D.ImageSet:
    idx = np.flatnonzero(mask)
    return D.ImageSet(images.images[idx], images.labels[idx], [images.samples[i] for i in idx])


# --- augmentation (training only, on top of the shared reader's output) -----------------------------------------


def augment(batch: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a uint8 batch [N,1,H,W], against the shortcuts a site leaves (its scanner's tone curve,
    contrast, sharpness and noise; its framing): histogram equalisation, then one affine warp (rotation, zoom,
    anisotropic crop, shift, horizontal flip), then brightness/contrast and gamma, then blur or sharpening, then
    Gaussian noise. Returns float in [0,255] (the models accept it like uint8)."""
    n = batch.shape[0]
    x = batch.to(torch.float32)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    def chosen(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    if cfg.equalize > 0:
        for i in torch.nonzero(chosen(cfg.equalize)).flatten().tolist():
            x[i] = _equalize(batch[i])
    angle = uniform(-cfg.rotation, cfg.rotation) * math.pi / 180
    scale = uniform(1 - cfg.zoom, 1 + cfg.zoom)
    flip = torch.where(chosen(0.5), -1.0, 1.0) if cfg.hflip else torch.ones(n)
    tx, ty = uniform(-cfg.shift, cfg.shift) * 2, uniform(-cfg.shift, cfg.shift) * 2
    sx = sy = torch.ones(n)
    if cfg.crop > 0:  # (drawn only when asked for, so runs without it keep their random stream)
        sx, sy = uniform(1 - cfg.crop, 1.0), uniform(1 - cfg.crop, 1.0)  # the share of each side a crop keeps
        tx, ty = tx + uniform(-1, 1) * (1 - sx), ty + uniform(-1, 1) * (1 - sy)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * sx * flip, -sin * sy, tx], 1), torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.contrast > 0:
        gain = uniform(1 - cfg.contrast, 1 + cfg.contrast).view(n, 1, 1, 1).to(x.device)
        bias = (uniform(-cfg.contrast, cfg.contrast) * 255).view(n, 1, 1, 1).to(x.device)
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * gain + mean + bias
    if cfg.gamma > 0:
        g = torch.exp(uniform(-math.log1p(cfg.gamma), math.log1p(cfg.gamma))).view(n, 1, 1, 1)
        x = 255.0 * (x.clamp(0, 255) / 255.0) ** g
    if cfg.blur > 0:
        # blend towards a blurred copy (w > 0: blur) or away from it (w < 0: unsharp masking)
        w = torch.where(chosen(cfg.blur), uniform(-1.0, 1.0), torch.zeros(n)).view(n, 1, 1, 1)
        x = x + w * (_gaussian_blur(x, sigma=max(0.5, x.shape[-1] / 224)) - x)
    if cfg.noise > 0:
        std = (uniform(0, cfg.noise) * 255).view(n, 1, 1, 1)
        x = x + std * torch.randn(x.shape, generator=generator)
    return x.clamp_(0, 255)


def _equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of one uint8 image [1,H,W] -> float [1,H,W] in [0,255]."""
    hist = torch.bincount(image.flatten().long(), minlength=256).to(torch.float64)
    cdf = hist.cumsum(0)
    lo = cdf[hist > 0][0]
    lut = ((cdf - lo) / max(float(cdf[-1] - lo), 1.0) * 255).clamp(0, 255).to(torch.float32)
    return lut[image.long()]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


# --- one run ------------------------------------------------------------------------------------------------------


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 64, device: torch.device | None = None
) -> np.ndarray:
    """Logits for uint8 [N,S,S] images: the evaluation path (no augmentation)."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).unsqueeze(1).to(device)
        out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def train(cfg: TrainConfig, run_dir: Path, resume: bool = True, stop_after: int | None = None) -> dict:
    """Train one architecture into run_dir; resumes from last.pt when present. Returns the run summary.
    The recipe top to bottom: the split and the model, the optimiser, schedule and moving average, then the loop:
    train_one_epoch, validate, keep best.pt, save_checkpoint (last.pt), early stopping.
    stop_after: end this call after that many epochs (the run can be resumed; a time-boxed session)."""
    run = RunDir(run_dir)
    run_dir = run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    last_path = run / RunDir.LAST
    if resume and last_path.is_file() and run.is_run():
        saved = run.config()
        saved.epochs = cfg.epochs  # the one setting a resume may change: train longer
        cfg = saved
    torch.manual_seed(cfg.seed)
    device = pick_device()
    facts: dict = {}
    train_set, val_set = prepare_split(cfg, run_dir, facts)
    cfg.save(run / RunDir.CONFIG)
    run.write_json(RunDir.DATA, facts)
    log.info(
        "run %s: %s, %d train / %d val images, image size %d, device %s, %d CPU threads",
        run_dir,
        cfg.architecture,
        len(train_set.labels),
        len(val_set.labels),
        cfg.image_size,
        device,
        torch.get_num_threads(),
    )
    log.info(
        "train class counts %s; val class counts %s",
        np.bincount(train_set.labels, minlength=len(cfg.classes)).tolist(),
        np.bincount(val_set.labels, minlength=len(cfg.classes)).tolist(),
    )
    if cfg.synthetic_demo:
        log.warning("SYNTHETIC DEMO DATA: phantoms from `cxr demo-data`; the model is a demo, not a medical model")
    if cfg.weights == "none":
        log.info("Training FROM SCRATCH: no pretrained weights (--weights none); every layer starts random")
    else:
        log.info(
            "Transfer learning from %s weights: head only for %d epoch(s), then top %s backbone block(s)",
            cfg.weights,
            cfg.frozen_epochs,
            "all" if cfg.fine_tune_layers is None else cfg.fine_tune_layers,
        )

    model = build_model(cfg.architecture, len(cfg.classes), cfg.weights, cfg.dropout).to(device)
    if model.pretrained:
        run.write_json(RunDir.PRETRAINED, model.pretrained)
    optimizer, max_lrs = _optimizer(model, cfg)
    steps_per_epoch = max(1, math.ceil(len(train_set.labels) / cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lrs, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
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
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=max_lrs,
                pct_start=0.15,
                total_steps=max(1, cfg.epochs - start_epoch) * steps_per_epoch,
            )
        log.info("resumed from %s after epoch %d (best val macro AUC %.4f)", last_path, start_epoch, best_auc)

    train_x = torch.from_numpy(train_set.images).unsqueeze(1)
    train_y = torch.from_numpy(train_set.labels)
    cut, cache_seconds = frozen_cut(model, cfg), 0.0
    train_cache, val_cache = None, None
    if cut is not None:
        t0 = time.perf_counter()
        train_cache = [
            _bottom_features(model, cut, train_set.images, cfg, view, torch.float16) for view in range(cfg.cache_views)
        ]
        val_cache = _bottom_features(model, cut, val_set.images, cfg, None, torch.float32)
        cache_seconds = time.perf_counter() - t0
        log.info(
            "cached the output of the %d frozen backbone blocks for %d augmented views of the training images and "
            "for validation: %.0f s, %.0f MB",
            cut,
            cfg.cache_views,
            cache_seconds,
            sum(c.numel() * c.element_size() for c in [*train_cache, val_cache]) / 2**20,
        )
    data = _EpochData(train_x, train_y, val_set, cut, train_cache, val_cache)
    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience:
            log.info("early stopping: no better validation macro AUC for %d epochs", stale)
            break
        t0 = time.perf_counter()
        trained = train_one_epoch(
            model, ema, optimizer, scheduler, data, cfg, epoch, steps_per_epoch, device, generator, weight
        )
        kept = ema.module if ema is not None else model  # the moving average is what is validated and kept
        validated = validate(kept, data, device, weight)
        record = {
            "epoch": epoch + 1,
            **trained,
            **validated,
            "lr": optimizer.param_groups[-1]["lr"],
            "epoch_seconds": time.perf_counter() - t0,
            "cache_seconds": cache_seconds if epoch == start_epoch else 0.0,  # --cache-views: computed once per call
        }
        history.append(record)
        auc = record["val_macro_auc"]
        if auc > best_auc or not (run / RunDir.BEST).exists():  # NaN (a class absent from val) never "improves"
            best_auc, stale = (auc if not math.isnan(auc) else best_auc), 0
            torch.save({"model": kept.state_dict(), "epoch": epoch + 1, "val_macro_auc": auc}, run / RunDir.BEST)
        else:
            stale += 1
        log.info(
            "epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f macro AUC %.4f%s | %.1f images/s, %.0f s",
            epoch + 1,
            cfg.epochs,
            record["train_loss"],
            record["train_accuracy"],
            record["val_loss"],
            record["val_accuracy"],
            record["val_macro_auc"],
            " (best)" if stale == 0 else "",
            record["train_images_per_second"],
            record["epoch_seconds"],
        )
        save_checkpoint(
            last_path,
            model,
            ema,
            optimizer,
            scheduler,
            generator,
            history=history,
            best_auc=best_auc,
            stale=stale,
            epoch=epoch + 1,
        )
        run.write_json(RunDir.HISTORY, history, indent=1)
        if stop_after is not None and epoch + 1 - start_epoch >= stop_after:
            log.info("stopping after %d epoch(s) as asked; resume with the same command", stop_after)
            break
    summary = {
        "run_dir": str(run_dir),
        "architecture": cfg.architecture,
        "best_val_macro_auc": best_auc,
        "epochs_run": len(history),
        "wall_seconds": sum(h["epoch_seconds"] for h in history),
    }
    log.info(
        "done: best validation macro AUC %.4f after %d epochs, %.0f s", best_auc, len(history), summary["wall_seconds"]
    )
    return summary


@dataclass
class _EpochData:
    """What each epoch trains and validates on: the training images, or (--cache-views) the cached outputs of the
    frozen blocks for each augmented view, which only the top `cut` blocks then see."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_set: D.ImageSet
    cut: int | None
    train_cache: list[torch.Tensor] | None
    val_cache: torch.Tensor | None


def train_one_epoch(
    model,
    ema,
    optimizer,
    scheduler,
    data: _EpochData,
    cfg: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
    device,
    generator: torch.Generator,
    weight,
) -> dict:
    """One pass over the training images in a seeded random order (augmented on the fly, or one cached view),
    updating the weights, the schedule and the moving average. Returns the epoch's training record."""
    from tqdm import tqdm

    if cfg.weights != "none":
        set_trainable_top(model, 0 if epoch < cfg.frozen_epochs else cfg.fine_tune_layers)
    model.train()
    _freeze_bn_of_frozen_blocks(model)
    order = torch.randperm(len(data.train_y), generator=generator)
    seen, loss_sum, correct = 0, 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(
        range(steps_per_epoch),
        desc=f"{cfg.architecture} epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        mininterval=5,
        leave=False,
    )
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a batch of one
            continue
        y = data.train_y[idx].to(device)
        if data.cut is None:
            logits = model(augment(data.train_x[idx], cfg, generator).to(device))
        else:
            cached = data.train_cache[epoch % cfg.cache_views][idx].to(device, torch.float32)
            logits = _top_logits(model, data.cut, cached)
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
    seconds = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": seconds,
        "train_images_per_second": seen / seconds if seconds > 0 else float("nan"),
    }


def validate(model, data: _EpochData, device, weight) -> dict:
    """Validation loss, accuracy and macro AUC (training/metrics.py, the one definition) of `model`."""
    if data.cut is None:
        logits = predict_logits(model, data.val_set.images, device=device)
    else:
        model.eval()
        with torch.no_grad():
            cache = data.val_cache
            logits = torch.cat(
                [_top_logits(model, data.cut, cache[i : i + 64].to(device)) for i in range(0, len(cache), 64)]
            )
            logits = logits.cpu().numpy()
    logits_t = torch.from_numpy(logits)
    labels = data.val_set.labels
    loss = float(
        F.cross_entropy(logits_t, torch.from_numpy(labels), weight=weight.cpu() if weight is not None else None)
    )
    probs = torch.softmax(logits_t, 1).numpy()
    return {
        "val_loss": loss,
        "val_accuracy": float((probs.argmax(1) == labels).mean()),
        "val_macro_auc": macro_auc(labels, probs),
    }


def save_checkpoint(
    path: Path,
    model,
    ema,
    optimizer,
    scheduler,
    generator: torch.Generator,
    *,
    history: list[dict],
    best_auc: float,
    stale: int,
    epoch: int,
) -> None:
    """Everything a resume needs to continue exactly (RunDir.LAST): weights, moving average, optimiser, schedule,
    history, early-stopping state and both random generators."""
    torch.save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "total_steps": scheduler.total_steps,
            "history": history,
            "best_auc": best_auc,
            "stale": stale,
            "epoch": epoch,
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        },
        path,
    )


def frozen_cut(model, cfg: TrainConfig) -> int | None:
    """How many backbone blocks stay frozen for the whole run, so that their output can be cached (--cache-views);
    None: no caching."""
    if cfg.cache_views <= 0 or cfg.weights == "none":
        return None
    if cfg.fine_tune_layers is None:
        log.warning("--cache-views needs --fine-tune-layers N (the blocks above the cache): not caching")
        return None
    n = len(backbone_blocks(model))
    return n - max(0, min(cfg.fine_tune_layers, n))


@torch.no_grad()
def _bottom_features(model, cut: int, images: np.ndarray, cfg: TrainConfig, view: int | None, dtype) -> torch.Tensor:
    """The frozen blocks' output for uint8 images [N,S,S]: augmented (view k has its own seed, so a resumed run
    recomputes the same views) or, for validation (view None), not."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + (view or 0) + 1)
    bottom = backbone_blocks(model)[:cut]
    model.eval()
    out = []
    for i in range(0, len(images), 32):
        x = torch.from_numpy(images[i : i + 32]).unsqueeze(1)
        h = model.normalize((augment(x, cfg, generator) if view is not None else x).to(device))
        for block in bottom:
            h = block(h)
        out.append(h.to(dtype).cpu())
    return torch.cat(out)


def _top_logits(model, cut: int, h: torch.Tensor) -> torch.Tensor:
    """The rest of the forward pass from the cached output of the first `cut` blocks."""
    for block in backbone_blocks(model)[cut:]:
        h = block(h)
    return model.classifier(model.dropout(h.mean(dim=(2, 3))))


def _optimizer(model, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW; with pretrained weights the backbone may learn at its own rate (--backbone-lr)."""
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None and cfg.weights != "none" else cfg.lr
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": backbone, "lr": backbone_lr}, {"params": rest, "lr": cfg.lr}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay), [backbone_lr, cfg.lr]


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
    for block in backbone_blocks(model):
        if not any(p.requires_grad for p in block.parameters()):
            block.eval()


def load_model(run_dir: Path, checkpoint: str = RunDir.BEST) -> tuple[torch.nn.Module, TrainConfig]:
    """The trained network of a run (eval mode, CPU)."""
    cfg = RunDir(run_dir).config()
    model = build_model(cfg.architecture, len(cfg.classes), "none", cfg.dropout)
    state = torch.load(Path(run_dir) / checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg

"""Training: the views a model learns from, unsupervised pre-training, few-shot adaptation.

Everything here works on decoded pixels (H x W x 3 uint8) and a model from `model.py`;
where the images come from (workspace, Beam jobs) is the callers' business.

- Views for training are crops, flips and quarter turns: they move pixels without changing
  a value. Nothing is resampled or colour-jittered, which would destroy the low bits.
- Pre-training (real images only, no labels): SimCLR-style contrastive learning on two
  views of each image, or, with folder labels, the paper's classification pretext.
- Adaptation: centre loss over gallery sources + lambda x real-prototype loss, early stopping
  on a held-out slice of the gallery.

What is decided with the embeddings (thresholds, votes, `unknown`) lives in `decide.py`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lida_core.allocator import keep_freed_memory
from lida_core.decide import REAL, real_prototype
from lida_core.embed import embed, model_inputs
from lida_core.losses import LidaLoss
from lida_core.model import Embedder

Progress = Callable[[dict], None]

# ---------------------------------------------------------------- views


def random_view(pixels: np.ndarray, size: int, rng: np.random.Generator, turns: bool = True, fit: str = "crop",
                part: bool = False) -> np.ndarray:
    """A training view, before the fingerprint; no resampling here.

    Crop fits: a random size x size crop (when the image allows). Resize fits (`paper`): the
    whole image, as a query is read, so that the fingerprint's own resize to the model input is
    the same preprocessing for training views and queries; with `part` (two views of one image
    for the contrastive pretext) a random region of at least half of each side instead. Then,
    with `turns`, a quarter turn and a flip.
    """
    height, width = pixels.shape[:2]
    if fit == "resize":
        if part:
            h, w = int(rng.integers((height + 1) // 2, height + 1)), int(rng.integers((width + 1) // 2, width + 1))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            pixels = pixels[top : top + h, left : left + w]
    else:
        if height > size:
            top = int(rng.integers(0, height - size + 1))
            pixels = pixels[top : top + size]
        if width > size:
            left = int(rng.integers(0, width - size + 1))
            pixels = pixels[:, left : left + size]
    if not turns:
        return np.ascontiguousarray(pixels)
    pixels = np.rot90(pixels, int(rng.integers(4)))
    if rng.integers(2):
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


# ---------------------------------------------------------------- pre-training


@dataclass
class PretrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    seed: int = 0
    input_kind: str = "fingerprint"
    labels: bool = False  # the paper's classification pretext (one class per sub-folder)
    view_size: int = 0  # contrastive view side; 0 = half the model input (two places of one image)


class _ProjectionHead(nn.Module):
    def __init__(self, dim: int, out: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2N - 1 others."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.t() / temperature
    n = a.shape[0]
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, targets)


def pretrain(
    model: Embedder,
    images: Sequence[np.ndarray],
    config: PretrainConfig,
    labels: Sequence[int] | None = None,
    progress: Progress | None = None,
    start_epoch: int = 0,
    head_state: dict | None = None,
    on_epoch_end: Callable[[int, dict, dict], None] | None = None,
    device: str | torch.device = "cpu",
    optimizer_state: dict | None = None,
) -> dict:
    """Train `model` in place on real images; returns the history and the head's state.

    `on_epoch_end(epoch, history_entry, state)` is where callers save a resumable state;
    `start_epoch` and `head_state` resume from it.
    """
    if len(images) < 2:
        raise ValueError("pre-training needs at least two images")
    keep_freed_memory()
    model.train().to(device)
    resize = model.fingerprint.fit == "resize"  # views are read as queries are: resized to the model input
    size = model.input_size if config.labels or resize else (config.view_size or model.input_size // 2)
    view_settings = model.fingerprint.with_size(size)
    fit = model.fingerprint.fit
    # The head's initial weights come from the run's seed, not from whatever the process drew before.
    torch.manual_seed(config.seed * 100_003 - 1)
    if config.labels:
        if labels is None:
            raise ValueError("classification pretext needs labels")
        head: nn.Module = nn.Linear(model.embedding_dim, int(max(labels)) + 1)
    else:
        head = _ProjectionHead(model.embedding_dim)
    if head_state:
        head.load_state_dict(head_state)
    head.to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state:
        optimiser.load_state_dict(optimizer_state)
    steps_per_epoch = max(1, len(images) // config.batch_size)
    total_steps = max(1, config.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, (step + start_epoch * steps_per_epoch) / total_steps)))
    )
    history = []
    for epoch in range(start_epoch, config.epochs):
        # Seeded per epoch, so a run resumed at epoch e continues exactly as it would have.
        torch.manual_seed(config.seed * 100_003 + epoch)
        rng = np.random.default_rng([config.seed, epoch])
        started = time.perf_counter()
        order = rng.permutation(len(images))
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(idx) < 2:
                continue
            views_a = [random_view(images[i], size, rng, model.turns, fit, part=not config.labels) for i in idx]
            xa = model_inputs(views_a, view_settings, config.input_kind).to(device)
            if config.labels:
                y = torch.tensor([labels[i] for i in idx], device=device)
                loss = F.cross_entropy(head(model.features(xa)), y)
            else:
                # Two places of one image share its noise process but not its content.
                views_b = [random_view(images[i], size, rng, model.turns, fit, part=True) for i in idx]
                xb = model_inputs(views_b, view_settings, config.input_kind).to(device)
                feats = model.features(torch.cat([xa, xb]))
                proj = head(feats)
                loss = nt_xent(proj[: len(idx)], proj[len(idx) :], config.temperature)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - started
        views = steps_per_epoch * config.batch_size * (1 if config.labels else 2)
        entry = {"epoch": epoch + 1, "epochs": config.epochs, "loss": float(np.mean(losses)), "images_per_s": views / max(elapsed, 1e-9)}
        history.append(entry)
        if progress:
            progress(entry)
        if on_epoch_end:
            on_epoch_end(epoch + 1, entry, {"head": head.state_dict(), "optimizer": optimiser.state_dict()})
    model.eval()
    return {"history": history, "head": head.state_dict()}


# ---------------------------------------------------------------- adaptation


@dataclass
class AdaptConfig:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lam: float = 0.9
    beta: float = 1.0  # weight of the centres' softmax partner (0 = the paper's two terms only)
    loss: str = "project"  # losses.LidaLoss form: "paper" (the paper's terms exactly) or "project"
    # p_r: "pretraining", the mean feature of the pre-training real images (the paper, fixed), or
    # "gallery", the mean feature of the gallery's real images, recomputed each epoch
    prototype: str = "gallery"
    tau: float = 0.1
    alpha: float = 0.5
    patience: int = 20
    min_epochs: int = 30  # no early stop before this many (capped at half the epochs)
    holdout: float = 0.2
    views_per_image: int = 4  # augmented views of each gallery image per epoch
    view_size: int = 0  # side of the training views; 0 = the model input (global pooling takes any size)
    seed: int = 0
    input_kind: str = "fingerprint"


@dataclass
class AdaptResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_holdout_accuracy: float = float("nan")
    train_index: list[int] = field(default_factory=list)
    holdout_index: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def split_holdout(labels: Sequence[str], fraction: float, seed: int,
                  prefer: Sequence[bool] | None = None) -> tuple[list[int], list[int]]:
    """Per source, hold out round(fraction x n) images (at least one where a source has 3+; none at fraction 0).

    `prefer`: per image, whether to hold it out first (the images a model to be judged was not
    trained on). The seeded shuffle is kept within each group, so with no preference, or with
    exactly the images a split with the same seed held out, the split is the same.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    first = None if prefer is None else np.asarray(prefer, dtype=bool)
    train, held = [], []
    for source in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == source)
        rng.shuffle(idx)
        if first is not None:
            idx = idx[np.argsort(~first[idx], kind="stable")]
        n_hold = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 3:
            n_hold = max(1, n_hold)
        n_hold = min(n_hold, len(idx) - 1)
        held += idx[:n_hold].tolist()
        train += idx[n_hold:].tolist()
    return sorted(train), sorted(held)


def holdout_folds(labels: Sequence[str], fraction: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """Folds of `split_holdout`'s size that hold out every image of a source once (sources of 3+ images).

    Fold f holds out, per source, the f-th run of round(fraction x n) images (at least one) of a
    seeded shuffle; a source runs out of folds when its images do, and always keeps one image
    to train on. A closed-form fit is cheap enough to repeat per fold, and a gate judged on
    every gallery image instead of one split is less a coin flip: with 5 images per source, one
    split holds out a single image of each.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    runs: dict[str, list[np.ndarray]] = {}
    for source in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == source)
        rng.shuffle(idx)
        n_hold = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1) if fraction > 0 and len(idx) >= 3 else 0
        runs[source] = [idx[i : i + n_hold] for i in range(0, len(idx), n_hold)] if n_hold else []
    folds = []
    for f in range(max((len(r) for r in runs.values()), default=0)):
        held = sorted(int(i) for r in runs.values() if f < len(r) for i in r[f])
        chosen = set(held)
        folds.append(([i for i in range(len(labels)) if i not in chosen], held))
    return folds


def holdout_accuracy(model: Embedder, images, labels, train_idx, held_idx, input_kind="fingerprint", device="cpu") -> float:
    """Leave-out accuracy: nearest-neighbour attribution of held-out images against the rest."""
    if not held_idx:
        return float("nan")
    labels = np.asarray(labels)
    emb = embed(model, [images[i] for i in train_idx + held_idx], input_kind=input_kind, device=device)
    g, q = emb[: len(train_idx)], emb[len(train_idx) :]
    nearest = np.argmax(q @ g.T, axis=1)
    return float(np.mean(labels[train_idx][nearest] == labels[held_idx]))


def adapt(
    model: Embedder,
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    config: AdaptConfig,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    pretraining_prototype: np.ndarray | None = None,
    split: tuple[list[int], list[int]] | None = None,
) -> AdaptResult:
    """Few-shot adaptation in place; the model ends at its best held-out epoch.

    `split`: (train, held-out) image indices; by default `split_holdout` with the config's share and seed.

    With `config.prototype == "pretraining"` the real-prototype loss pulls towards
    `pretraining_prototype` (the mean feature of the pre-training real images, fixed), which
    must then be given.
    """
    if config.prototype == "pretraining" and pretraining_prototype is None:
        raise ValueError("adaptation with the pre-training prototype needs it: this model has none (pre-train it first)")
    labels = [str(label) for label in labels]
    sources = sorted(set(labels))
    if len(sources) < 2:
        raise ValueError("adaptation needs at least two sources in the gallery")
    if REAL not in sources:
        raise ValueError("adaptation needs real images in the gallery (source 'real')")
    keep_freed_memory()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_idx, held_idx = split if split is not None else split_holdout(labels, config.holdout, config.seed)
    class_of = {s: i for i, s in enumerate(sources)}
    y_all = torch.tensor([class_of[s] for s in labels])
    real_class = class_of[REAL]
    criterion = LidaLoss(len(sources), model.embedding_dim, lam=config.lam, alpha=config.alpha, tau=config.tau, beta=config.beta,
                         form=config.loss)
    train_images = [images[i] for i in train_idx]
    with torch.no_grad():
        start = torch.from_numpy(embed(model, train_images, input_kind=config.input_kind, device=device))
    criterion.center.init_centers(start, y_all[train_idx])
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result = AdaptResult(train_index=train_idx, holdout_index=held_idx)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best = holdout_accuracy(model, images, labels, train_idx, held_idx, config.input_kind, device)
    result.best_holdout_accuracy = best
    stale = 0
    size = model.input_size if model.fingerprint.fit == "resize" else (config.view_size or model.input_size)
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.eval()
        if config.prototype == "pretraining":
            prototype = torch.as_tensor(np.asarray(pretraining_prototype, dtype=np.float32)).to(device)
        else:
            with torch.no_grad():
                real_feats = embed(model, [images[i] for i in train_idx if labels[i] == REAL], input_kind=config.input_kind,
                                   device=device)
            prototype = torch.from_numpy(real_prototype(real_feats)).to(device)
        model.train()
        order = rng.permutation(np.repeat(np.asarray(train_idx), config.views_per_image))
        losses = []
        for s in range(0, len(order), config.batch_size):
            idx = order[s : s + config.batch_size]
            if len(idx) < 2:
                continue
            views = [random_view(images[i], size, rng, model.turns, model.fingerprint.fit) for i in idx]
            x = model_inputs(views, model.fingerprint, config.input_kind).to(device)
            y = y_all[idx].to(device)
            feats = F.normalize(model(x), dim=1)
            loss, parts = criterion(feats, y, (y == real_class).long(), prototype)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            criterion.center.update_centers(feats.detach().cpu(), y.cpu())
            losses.append(parts)
        accuracy = holdout_accuracy(model, images, labels, train_idx, held_idx, config.input_kind, device)
        entry = {
            "epoch": epoch + 1,
            "epochs": config.epochs,
            "loss": float(np.mean([p["total"] for p in losses])) if losses else float("nan"),
            "holdout_accuracy": accuracy,
            "seconds": time.perf_counter() - started,
        }
        result.history.append(entry)
        if progress:
            progress(entry)
        # A few held-out images make a noisy score: ties go to the later (more trained) epoch,
        # and patience only starts counting after a minimum of epochs.
        if not math.isnan(accuracy) and (math.isnan(best) or accuracy >= best):
            best, stale = accuracy, 0
            result.best_epoch = epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif held_idx:
            stale += 1
            if stale >= config.patience and epoch + 1 >= min(config.min_epochs, config.epochs // 2):
                break
        else:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result.best_epoch = epoch + 1
    model.load_state_dict(best_state)
    model.eval()
    result.best_holdout_accuracy = best
    return result

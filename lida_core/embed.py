"""The one embed path on decoded pixels: fingerprint (or RGB, for the ablation) -> model -> normalised embedding.

`tile_sums` is the tiling loop: a crop-fit model reads up to `tiles` non-overlapping tiles
of an image and an image's embedding is the normalised mean over them; a resize fit reads the
whole image once. `described_sums` is its twin for a stem that reads the decoded pixels
where the tiles lie (srm), with the same tiles and sums. Training, evaluation, calibration
and the scan all embed through `embed` (`accel.DeviceEmbedder` is its batched device twin,
tested equal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lida_core.allocator import keep_freed_memory
from lida_core.fingerprint import FingerprintSettings, fingerprint_bits, fit_to_size, tile_views, to_model_input
from lida_core.model import Embedder


def model_inputs(images: Sequence[np.ndarray], settings: FingerprintSettings, input_kind: str = "fingerprint") -> torch.Tensor:
    """Model input batch: fingerprints (the method), or plain RGB with the same fit (the ablation)."""
    if input_kind == "fingerprint":
        return to_model_input(np.stack([fingerprint_bits(image, settings) for image in images]))
    if input_kind == "rgb":
        return to_model_input(np.stack([np.ascontiguousarray(fit_to_size(image, settings)) for image in images]))
    raise ValueError(f"input kind must be 'fingerprint' or 'rgb', got {input_kind!r}")


@torch.no_grad()
def tile_sums(
    model: Embedder,
    images: Sequence[np.ndarray],
    forward: Callable[[torch.Tensor], np.ndarray],
    dim: int,
    batch_size: int = 64,
    input_kind: str = "fingerprint",
    tiles: int | None = None,
    dtype: type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """(N x dim sums of `forward` over each image's tiles, N tile counts): the one tiling loop.

    Crop-fit models read up to `tiles` non-overlapping tiles of an image (None: the profile's
    choice); a resize fit reads the whole image once. `forward` maps a model-input batch to
    a numpy batch (an embedding, or a fixed stem's descriptor).
    """
    tiles = model.tiles if tiles is None else tiles
    if model.fingerprint.fit != "crop":
        tiles = 1
    views, owner = [], []
    for i, image in enumerate(images):
        parts = tile_views(image, model.input_size, tiles)
        views += parts
        owner += [i] * len(parts)
    feats = np.zeros((len(views), dim), dtype=dtype)
    for start in range(0, len(views), batch_size):
        feats[start : start + min(batch_size, len(views) - start)] = forward(
            model_inputs(views[start : start + batch_size], model.fingerprint, input_kind))
    owner = np.asarray(owner, dtype=np.int64)
    out = np.zeros((len(images), dim), dtype=dtype)
    np.add.at(out, owner, feats)
    return out, np.bincount(owner, minlength=len(images))


def reads_pixels(model: Embedder) -> bool:
    """Whether the model's stem reads decoded pixels where its tiles lie (srm's `describe`): a fixed stem, crop fits.

    The one test both embedders use (`accel.DeviceEmbedder`, the closed-form fit in
    `lida_core.statistical`): what one of them embeds this way, the other must too.
    (Such a stem refuses binary fingerprints when it is built, so the mode needs no test here.)
    """
    return hasattr(getattr(model, "stem", None), "describe") and model.fingerprint.fit == "crop"


def described_sums(
    model: Embedder,
    images: Sequence[np.ndarray],
    head: Callable[[torch.Tensor], np.ndarray],
    dim: int,
    batch_size: int = 32,
    dtype: type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """`tile_sums` for a stem that reads decoded pixels itself (srm's `SrmStem.describe`, crop fits).

    The stem describes every tile of `batch_size` images at a time, straight from their pixels;
    `head` maps those descriptors to a numpy batch (the embedding, or the descriptors themselves).
    """
    out = np.zeros((len(images), dim), dtype=dtype)
    counts = np.zeros(len(images), dtype=np.int64)
    for start in range(0, len(images), batch_size):
        chunk = [images[i] for i in range(start, min(start + batch_size, len(images)))]
        described, owners = model.stem.describe(chunk, model.fingerprint, model.input_size, model.tiles)
        np.add.at(out, owners + start, head(described))
        np.add.at(counts, owners + start, 1)
    return out, counts


def embed(
    model: Embedder,
    images: Sequence[np.ndarray],
    batch_size: int = 64,
    input_kind: str = "fingerprint",
    device: str | torch.device = "cpu",
    tiles: int | None = None,
) -> np.ndarray:
    """L2-normalised embeddings (N x D float32) of decoded images, in evaluation mode.

    With `tiles` > 1 (crop-fit models), an image's embedding is the normalised mean over
    up to that many non-overlapping tiles; None takes the model profile's choice.
    """
    keep_freed_memory()
    model.eval().to(device)
    if input_kind == "fingerprint" and tiles in (None, model.tiles) and reads_pixels(model):
        # srm: straight from the pixels, as a scan and the closed-form fit describe them (the same
        # values as its stem on each tile's fingerprint; a split stem reads the high bits too).
        return embed_described(model, images, min(batch_size, 32), device)
    out, _ = tile_sums(model, images, lambda x: F.normalize(model(x.to(device)).float(), dim=1).cpu().numpy(),
                       model.embedding_dim, batch_size, input_kind, tiles)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


@torch.no_grad()
def embed_described(model: Embedder, images: Sequence[np.ndarray], batch_size: int = 32,
                    device: str | torch.device = "cpu") -> np.ndarray:
    """`embed` for a stem that reads decoded pixels (`reads_pixels`): each image's tiles described, the head, normalised."""
    out, _ = described_sums(model, images, lambda d: F.normalize(model.backbone(d.to(device)).float(), dim=1).cpu().numpy(),
                            model.embedding_dim, batch_size)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

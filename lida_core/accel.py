"""The accelerated embed path: CPU workers decode and keep the low bits, the device does the rest.

Split of the fingerprint (bit-identical to `fingerprint.fingerprint_bits`, tested on CPU):
- CPU (`prepare`): the one Pillow decoder's pixels -> tile views -> the region the settings read
  (patch selection needs the full pixel values) -> `x & mask` as uint8, centre-cropped when the
  fit is a crop (indexing only, so less to transfer).
- device (`finish`): binarise or scale, Pillow-exact bilinear resize for resize fits, then
  float, channels_last (every device) and the model under bf16 autocast (CUDA), optionally compiled.

`DeviceEmbedder` overlaps the two: a thread prepares the next batch into pinned memory while the
device computes the current one. On a CPU-only machine the same code runs with device "cpu"
(no pinning, no autocast), which is how CI exercises it.

`exact_topk` is the attribution search for CUDA: normalised matmul + top-k in gallery chunks,
the same neighbours as a FAISS flat inner-product index up to ties.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lida_core.embed import embed_described, reads_pixels
from lida_core.fingerprint import (
    FingerprintSettings,
    fit_to_size,
    load_pixels,
    load_tile_bits,
    tile_views,
    to_model_input,
)
from lida_core.fingerprint import prepare_low_bits as prepare
from lida_core.model import Embedder


def finish(kept: torch.Tensor, settings: FingerprintSettings) -> torch.Tensor:
    """Device half: N x H x W x 3 kept bits (uint8, one size) -> N x S x S x 3 uint8 fingerprints."""
    if settings.mode == "binary":
        region = (kept != 0).to(torch.uint8) * 255
    else:
        region = (kept.to(torch.int16) * settings.scale_factor).to(torch.uint8)
    if settings.fit == "crop" and region.shape[1] == region.shape[2] == settings.size:
        return region
    return fit_to_size(region, settings)


def pick_batch_size(device: torch.device, input_size: int) -> int:
    """Large batches keep a GPU busy; memory grows with the input area (256 px: 256 on a big card)."""
    if device.type != "cuda":
        return 32
    free, _ = torch.cuda.mem_get_info(device)
    per_image = 12 * 1024 * 1024 * (input_size / 256) ** 2  # measured order of the paper encoder's activations in bf16
    return int(max(32, min(512, 2 ** int(np.log2(max(1, 0.5 * free / per_image))))))


class DeviceEmbedder:
    """Embeds decoded images on `device` with the CPU/device split above; same output as embed.embed."""

    def __init__(self, model: Embedder, device: str | torch.device = "cpu", batch_size: int | None = None,
                 compile: bool = False, autocast: bool | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.model = model.eval().to(self.device)
        self.settings = model.fingerprint
        self.tiles = model.tiles if self.settings.fit == "crop" else 1
        self.autocast = self.cuda if autocast is None else autocast
        # channels_last on every device: on CPU too, the convolutions run ~25% faster with it
        # (measured on this 2-core machine, small profile: 2.8 s against 3.7 s for 300 images)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model, dynamic=False) if compile else self.model
        self.batch_size = batch_size or pick_batch_size(self.device, model.input_size)
        # A weightless stem that reads the kept bits themselves (srm) takes them as they are:
        # scaling them into a float fingerprint only for the stem to divide it back costs 30%.
        # Given decoded images (`embed`), it reads their pixels where the tiles lie, uncopied.
        # (`embed.reads_pixels`: the closed-form fit describes its images the same way.)
        self.reads_kept = reads_pixels(model)

    # CPU side -------------------------------------------------------------------------
    def views(self, index: int, image: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(image index, kept low bits) for each tile view of one decoded image."""
        return [(index, prepare(tile, self.settings)) for tile in tile_views(image, self.model.input_size, self.tiles)]

    def _batches(self, views: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(owners, uint8 batch of one shape), filled as views arrive; pinned for an asynchronous copy on CUDA."""
        buckets: dict[tuple, tuple[list[int], list[np.ndarray]]] = {}

        def emit(shape):
            owners, arrays = buckets.pop(shape)
            batch = torch.from_numpy(np.stack(arrays))
            return owners, batch.pin_memory() if self.cuda else batch

        for owner, view in views:
            owners, arrays = buckets.setdefault(view.shape, ([], []))
            owners.append(owner)
            arrays.append(view)
            if len(arrays) >= self.batch_size:
                yield emit(view.shape)
        for shape in list(buckets):
            yield emit(shape)

    # device side ----------------------------------------------------------------------
    @torch.no_grad()
    def run(self, views: Iterable[tuple[int, np.ndarray]], count: int) -> np.ndarray:
        """Embed a stream of (image index, kept bits) views of `count` images: CPU work in a thread."""
        dim = self.model.embedding_dim
        out = np.zeros((count, dim), dtype=np.float32)
        ready: queue.Queue = queue.Queue(maxsize=3)

        def produce() -> None:
            try:
                for item in self._batches(views):
                    ready.put(item)
            except BaseException as exc:  # surfaced in the consumer
                ready.put(exc)
            ready.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            owners, kept = item
            kept = kept.to(self.device, non_blocking=True)
            if self.reads_kept:
                feats = F.normalize(self.model.backbone(self.model.stem.from_low_bits(kept)).float(), dim=1).cpu().numpy()
            else:
                x = to_model_input(finish(kept, self.settings)).contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    feats = F.normalize(self.forward(x).float(), dim=1).cpu().numpy()
            np.add.at(out, np.asarray(owners, dtype=np.int64), feats)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised N x D float32 embeddings of decoded images, tiles averaged as in embed.embed."""
        if self.reads_kept:
            return self._embed_described(images)
        return self.run((v for i, image in enumerate(images) for v in self.views(i, image)), len(images))

    def _embed_described(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """A stem that reads the pixels themselves (srm's `describe`): batch_size images at a time on the device."""
        return embed_described(self.model, images, self.batch_size, self.device)

    def embed_files(self, uris: Sequence[str], workers: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """Files -> embeddings: decode + CPU half in `workers` processes, the rest on the device.

        Returns the embeddings (a zero row for a file that failed) and {position: reason}.
        """
        import multiprocessing as mp

        errors: dict[int, str] = {}
        if self.reads_kept and getattr(self.model.stem, "reads_classes", False):  # split or quiet srm
            return self._embed_files_described(uris, workers, errors)
        jobs = [(i, uri, str(self.settings), self.model.input_size, self.tiles) for i, uri in enumerate(uris)]

        def stream(pool):
            for i, result in pool.imap_unordered(load_tile_bits, jobs, chunksize=4):
                if isinstance(result, str):
                    errors[i] = result
                    continue
                for view in result:
                    yield i, view

        # spawn: workers must not inherit a CUDA context (or torch's thread pools) by forking
        with mp.get_context("spawn").Pool(workers or os.cpu_count() or 1) as pool:
            out = self.run(stream(pool), len(uris))
        for i in errors:
            out[i] = 0.0
        return out, errors

    def _embed_files_described(self, uris: Sequence[str], workers: int | None, errors: dict[int, str]):
        """embed_files for a stem that reads whole decoded pixels (split srm): workers decode, this process describes.

        Such a stem needs each pixel's high bits for its content classes, which the kept low
        bits that `load_tile_bits` sends do not hold.
        """
        import multiprocessing as mp

        out = np.zeros((len(uris), self.model.embedding_dim), dtype=np.float32)
        jobs = [(i, uri, self.settings.jpeg) for i, uri in enumerate(uris)]
        chunk: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if chunk:
                out[[i for i, _ in chunk]] = self._embed_described([p for _, p in chunk])
                chunk.clear()

        with mp.get_context("spawn").Pool(workers or os.cpu_count() or 1) as pool:
            for i, result in pool.imap_unordered(load_pixels, jobs, chunksize=4):
                if isinstance(result, str):
                    errors[i] = result
                    continue
                chunk.append((i, result))
                if len(chunk) >= self.batch_size:
                    flush()
            flush()
        return out, errors


@torch.no_grad()
def exact_topk(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int,
               device: str | torch.device = "cpu", chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products (similarities, row ids) of normalised float32 vectors, gallery in chunks."""
    device = torch.device(device)
    q = torch.as_tensor(queries, dtype=torch.float32).to(device)
    g_all = torch.as_tensor(gallery, dtype=torch.float32)
    k = min(k, len(g_all))
    best_s = torch.full((len(q), k), -float("inf"), device=device)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64, device=device)
    for start in range(0, len(g_all), chunk):
        g = g_all[start : start + chunk].to(device)
        sims = q @ g.T
        s, i = torch.topk(sims, min(k, len(g)), dim=1)
        merged_s = torch.cat([best_s, s], dim=1)
        merged_i = torch.cat([best_i, i + start], dim=1)
        top = torch.topk(merged_s, k, dim=1)
        best_s, best_i = top.values, torch.gather(merged_i, 1, top.indices)
    return best_s.cpu().numpy(), best_i.cpu().numpy()

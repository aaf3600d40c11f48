"""Model lifecycle in a workspace: init, pre-train, gallery rows, adapt (evaluation: `evaluate.py`).

These are the verbs' logic without the command line. Every step that publishes holds the
workspace lock. A model version is published whole and `models/CURRENT` only moves after
it, so a crash (even kill -9) leaves the current model untouched and usable.

Over 400 lines on purpose: every step here makes or carries a model version, and they share
its meta format, its decider and the gallery it is published with; one file keeps a version's
whole life readable in order.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import schemas
from lida_core import decide, failpoints, statistical, training
from lida_core.decode import JPEG_FORMATS, DecodeError, decode_image
from lida_core.embed import embed
from lida_core.inputs import labelled_folders, list_inputs, read_input
from lida_core.model import (
    CheckpointError,
    Embedder,
    build_model,
    checkpoint_bytes,
    get_profile,
    load_checkpoint,
    load_upstream_weights,
)
from lida_core.workspace import MODELS, TABLES, Workspace, WorkspaceConfig, WorkspaceError, utc_now

Progress = Callable[[str, dict], None]
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
MIN_CALIBRATION = 8

# Per-profile training defaults: the paper's numbers for its ResNet-50; the CPU profile
# trains from scratch and needs a larger step to move within minutes.
PRETRAIN_DEFAULTS = {"small": {"epochs": 15, "batch_size": 64, "lr": 1e-3}, "paper": {"epochs": 30, "batch_size": 32, "lr": 1e-4}}
# CPU profiles adapt on 16 views of 64 px per gallery image instead of 4 of 128 px (the same
# pixels per epoch): more distinct samples from 5 images. 3-seed 5-shot means in docs/results.md.
ADAPT_DEFAULTS = {"small": {"epochs": 60, "lr": 1e-3, "view_size": 64, "views_per_image": 16},
                  # The paper: L_A + 0.9 L_D exactly (no cross-entropy), p_r the pre-training real mean.
                  "paper": {"epochs": 100, "lr": 1e-4, "view_size": 0, "views_per_image": 4, "beta": 0.0, "loss": "paper",
                            "prototype": "pretraining"},
                  # The statistics profile adapts with the centre loss alone: the real-prototype and
                  # softmax terms lowered 5-shot Rank-1 to 0.65 (3 seeds; docs/results.md), and
                  # detection uses the contrast rule instead of the prototype similarity.
                  "stats": {"epochs": 100, "lr": 1e-3, "view_size": 0, "views_per_image": 4, "lam": 0.0, "beta": 0.0}}


def adapt_config(profile: str, epochs: int | None, lr: float | None, seed: int, input_kind: str,
                 holdout: float | None = None) -> training.AdaptConfig:
    """The profile's adaptation defaults, with the user's epochs, learning rate and held-out share where given."""
    defaults = ADAPT_DEFAULTS.get(profile, ADAPT_DEFAULTS["small"])
    extra = {} if holdout is None else {"holdout": holdout}
    return training.AdaptConfig(epochs=epochs or defaults["epochs"], lr=lr or defaults["lr"], seed=seed, input_kind=input_kind, **extra,
                                view_size=defaults["view_size"], views_per_image=defaults["views_per_image"],
                                **{k: defaults[k] for k in ("lam", "beta", "loss", "prototype") if k in defaults})


def detection_method(config: WorkspaceConfig) -> str:
    """The workspace's detection rule: its config's, else its profile's."""
    return config.detection or get_profile(config.profile).detection


def quiet(_: str, __: dict) -> None:
    return None


# ---------------------------------------------------------------- loading images


@dataclass
class Decoded:
    uris: list[str]
    image_ids: list[str]
    pixels: list[np.ndarray]
    raw: list[bytes]
    errors: list[tuple[str, str]]
    jpeg: list[bool] = field(default_factory=list)  # per decoded image: a JPEG file


class LazyImages(Sequence):
    """Decoded pixels of kept file bytes, decoded again on each read: memory holds the compressed files only.

    For passes that read each image once or twice (the closed-form fits): 95 camera photographs
    of 24 MP each would otherwise hold 7 GB of pixels at once.
    """

    def __init__(self, raw: Sequence[bytes], names: Sequence[str]):
        self.raw, self.names = list(raw), list(names)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyImages(self.raw[index], self.names[index])
        return decode_image(self.raw[index], self.names[index]).pixels

    def take(self, indexes: Sequence[int]) -> LazyImages:
        return LazyImages([self.raw[i] for i in indexes], [self.names[i] for i in indexes])


def decode_inputs(uris: Sequence[str], progress: Progress = quiet, keep_bytes: bool = False, lazy: bool = False) -> Decoded:
    """Read and decode every input; `lazy` keeps only the bytes (pixels become a LazyImages, decoded when read)."""
    out = Decoded([], [], [], [], [])
    for n, uri in enumerate(uris, 1):
        try:
            data = read_input(uri)
            decoded = decode_image(data, uri)
        except DecodeError as exc:
            out.errors.append((uri, exc.reason))
        except OSError as exc:
            out.errors.append((uri, f"unreadable: {exc}"))
        else:
            out.uris.append(uri)
            out.image_ids.append(hashlib.sha256(data).hexdigest())
            if not lazy:
                out.pixels.append(decoded.pixels)
            out.jpeg.append(decoded.format in JPEG_FORMATS)
            if keep_bytes or lazy:
                out.raw.append(data)
            del decoded
        progress("decode", {"done": n, "total": len(uris)})
    if lazy:
        out.pixels = LazyImages(out.raw, out.uris)
    return out


# ---------------------------------------------------------------- models in the workspace


@dataclass
class LoadedModel:
    version: str
    model: Embedder
    meta: dict

    @property
    def input_kind(self) -> str:
        return self.meta.get("input", "fingerprint")

    @property
    def decider(self) -> decide.Decider | None:
        data = self.meta.get("decider")
        return decide.Decider.from_dict(data) if data else None

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return embed(self.model, images, input_kind=self.input_kind)


def default_profile() -> str:
    # On CPUs, the SRM profile: on real generators (../shared/devset, 5 seeds, docs/results.md)
    # it is the one whose decisions hold, and it fits in seconds instead of training for minutes.
    return "paper" if torch.cuda.is_available() else "srm"


def load_model(ws: Workspace, version: str | None = None) -> LoadedModel:
    config = ws.config()
    version = version or ws.require_model_version()
    meta = ws.model_meta(version)
    data = ws.model_bytes(version)
    try:
        model, _ = load_checkpoint(ws.model_file(version), profile=config.profile, fingerprint=config.fingerprint, data=data)
    except CheckpointError as exc:
        raise WorkspaceError(str(exc)) from None
    return LoadedModel(version, model.eval(), meta)


def publish(ws: Workspace, model: Embedder, meta: dict, make_current: bool) -> str:
    version = ws.publish_model_version({"model.pt": checkpoint_bytes(model, {"kind": meta.get("kind")})}, meta)
    if make_current:
        ws.set_current_model(version)
    return version


def init_workspace(url: str, profile: str | None = None, checkpoint: str | None = None, seed: int = 0,
                   fingerprint_mode: str | None = None, patch_select: str | None = None, patch_seed: int = 0) -> dict:
    """Create the workspace and model version 0. `fingerprint_mode` "binary" takes the paper's
    binarised low bits instead of the profile's scaled ones (the authors' released code);
    `patch_select` (max, min, random with `patch_seed`) reads one 32 x 32 patch instead of the
    whole image (for `paper`, the authors' patch mode: `fingerprint.authors_patch`)."""
    ws = Workspace(url)
    if ws.is_initialised():
        raise WorkspaceError(f"{url} is already a lida workspace (current model {ws.current_model_version()})")
    profile = profile or default_profile()
    overrides: dict = {} if fingerprint_mode is None else {"mode": fingerprint_mode}
    if patch_select is not None:
        overrides.update(region="patch", patch_select=patch_select, seed=patch_seed if patch_select == "random" else 0)
    settings = replace(get_profile(profile).fingerprint, **overrides)
    torch.manual_seed(seed)
    source = "random"
    try:
        if checkpoint:
            try:
                model, _ = load_checkpoint(checkpoint, profile=profile)
                source = "lida checkpoint"
            except CheckpointError as exc:
                if profile != "paper" or "not a lida checkpoint" not in str(exc):
                    raise
                model = load_upstream_weights(checkpoint)
                source = "upstream LIDA .pth"
                # the .pth holds weights only: its fingerprint is whatever the user says it was trained on
                model.fingerprint = replace(model.fingerprint, **overrides)
            if model.fingerprint != replace(model.fingerprint, **overrides):
                raise WorkspaceError(f"the checkpoint was trained on fingerprints {model.fingerprint}, not "
                                     f"{replace(model.fingerprint, **overrides)}")
        else:
            model = build_model(profile, settings)
    except (CheckpointError, ValueError) as exc:
        raise WorkspaceError(str(exc)) from None
    config = WorkspaceConfig(profile=profile, fingerprint=str(model.fingerprint), created_at=utc_now().isoformat())
    with ws.lock("init"):
        _clear_unfinished_init(ws)
        meta = {
            "kind": "init",
            "parent": None,
            "profile": profile,
            "fingerprint": str(model.fingerprint),
            "input": "fingerprint",
            "tiles": model.tiles,
            "weights": source,
            "checkpoint": checkpoint,
            "data": {},
            "training": {"seed": seed},
            "metrics": {},
            "decider": None,
        }
        version = publish(ws, model, meta, make_current=True)
        failpoints.reached("init:model")
        ws.save_config(config)  # last: a workspace is initialised once its first model is in place
    return {"workspace": ws.url, "profile": profile, "fingerprint": str(model.fingerprint), "model_version": version, "weights": source}


def _clear_unfinished_init(ws: Workspace) -> None:
    """A folder without config.json that holds only what a killed `lida init` wrote (init models) is cleared for a new init."""
    versions = ws.model_versions()
    if not versions:
        return
    kinds = {ws.model_meta(v).get("kind") for v in versions}
    if kinds != {"init"}:
        raise WorkspaceError(f"{ws.url} holds trained models but no config.json: restore config.json rather than re-initialising")
    ws.fs.rm(ws.path(MODELS), recursive=True)


def _data_summary(image_ids: Sequence[str], sources: Sequence[str]) -> dict:
    counts: dict[str, int] = {}
    for s in sources:
        counts[s] = counts.get(s, 0) + 1
    digest = hashlib.sha256("\n".join(sorted(f"{s}:{i}" for s, i in zip(sources, image_ids, strict=True))).encode())
    return {"count": len(image_ids), "sources": counts, "content_sha256": digest.hexdigest()}


# ---------------------------------------------------------------- pre-training


def pretrain_version(
    ws: Workspace,
    paths: Sequence[str],
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    labels: str | None = None,
    input_kind: str = "fingerprint",
    seed: int = 0,
    progress: Progress = quiet,
    before_current: Callable[[str], object] | None = None,
) -> dict:
    """Unsupervised pre-training on real images -> a new current model version.

    The gallery registered so far is carried over (re-embedded by the new model), and
    `before_current(version)` (the index rebuild) runs before the new version becomes
    current: a kill at any step leaves a current model with its gallery and its index.

    Resumable: the run's state is saved after every epoch under runs/pretrain-<key>/ and a
    re-run with the same inputs and settings continues from the last finished epoch.
    """
    ws.require()
    config = ws.config()
    defaults = PRETRAIN_DEFAULTS.get(config.profile, PRETRAIN_DEFAULTS["small"])
    if input_kind == "rgb" and get_profile(config.profile).stem != "none":
        raise WorkspaceError(f"the {config.profile} profile reads low-bit fingerprints; "
                             "make the RGB ablation in a workspace made with 'lida init --profile small'")
    cfg = training.PretrainConfig(
        epochs=defaults["epochs"] if epochs is None else epochs,
        batch_size=batch_size or defaults["batch_size"],
        lr=lr or defaults["lr"],
        seed=seed,
        input_kind=input_kind,
        labels=labels == "folders",
    )
    if labels not in (None, "folders"):
        raise WorkspaceError("--labels takes 'folders' (one sub-folder per class)")
    if cfg.labels:
        if len(paths) != 1:
            raise WorkspaceError("--labels folders takes exactly one folder with one sub-folder per class")
        groups = labelled_folders(paths[0])
        uris = [u for files in groups.values() for u in files]
        class_of = {u: i for i, files in enumerate(groups.values()) for u in files}
    else:
        uris = list_inputs(paths)
    if len(uris) < 2 * MIN_CALIBRATION:
        raise WorkspaceError(f"pre-training needs at least {2 * MIN_CALIBRATION} real images, found {len(uris)}")
    closed_form = get_profile(config.profile).fit == "closed-form"  # one pass over the images: keep bytes, not pixels
    decoded = decode_inputs(uris, progress, keep_bytes=True, lazy=closed_form)
    if len(decoded.pixels) < 2 * MIN_CALIBRATION:
        raise WorkspaceError(f"only {len(decoded.pixels)} of {len(uris)} images could be decoded")
    # Hold out a calibration slice of real images, chosen by content hash (stable across runs).
    order = sorted(range(len(decoded.pixels)), key=lambda i: hashlib.sha256((decoded.image_ids[i] + str(seed)).encode()).hexdigest())
    n_cal = max(MIN_CALIBRATION, int(round(get_profile(config.profile).calibration_share * len(order))))
    cal_idx, train_idx = sorted(order[:n_cal]), sorted(order[n_cal:])
    train_images = decoded.pixels.take(train_idx) if closed_form else [decoded.pixels[i] for i in train_idx]
    class_labels = [class_of[decoded.uris[i]] for i in train_idx] if cfg.labels else None

    parent = ws.require_model_version()
    current = load_model(ws, parent)
    if current.input_kind != input_kind and parent != "v0000" and current.meta.get("kind") != "init":
        raise WorkspaceError(f"the current model takes {current.input_kind} input, not {input_kind}")
    model = current.model
    key = hashlib.sha256(
        json.dumps({"parent": parent, "ids": sorted(decoded.image_ids), "config": asdict(cfg)}, sort_keys=True).encode()
    ).hexdigest()[:16]
    state_rel = ws.run_path(f"pretrain-{key}", "state.pt")
    start_epoch, head_state, opt_state = 0, None, None
    if ws.exists(state_rel):
        state = torch.load(io.BytesIO(ws.read_bytes(state_rel)), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        start_epoch, head_state, opt_state = int(state["epoch"]), state["head"], state["optimizer"]
        progress("resume", {"epoch": start_epoch, "epochs": cfg.epochs})

    def save_state(epoch: int, entry: dict, extra: dict) -> None:
        buffer = io.BytesIO()
        torch.save({"epoch": epoch, "model": model.state_dict(), **extra}, buffer)
        ws.write_bytes(state_rel, buffer.getvalue())
        progress("epoch", entry)

    closed_form = model.fit == "closed-form"
    with ws.lock("pretrain"):
        if closed_form:  # a fixed stem: keep the real descriptors and fit the head on them, no epochs
            progress("fit", {"images": len(train_images)})
            reference = statistical.fit_pretrain(model, train_images, seed)
            result = {"history": []}
            cfg.epochs = 0
        else:
            result = training.pretrain(
                model,
                train_images,
                cfg,
                labels=class_labels,
                start_epoch=start_epoch,
                head_state=head_state,
                optimizer_state=opt_state,
                on_epoch_end=save_state,
            )
        loaded = LoadedModel("candidate", model, {"input": input_kind})
        cal_images = decoded.pixels.take(cal_idx) if closed_form else [decoded.pixels[i] for i in cal_idx]
        cal_jpeg = [decoded.jpeg[i] for i in cal_idx]
        jpeg_threshold = None
        if closed_form:
            real = statistical.embeddings_from_descriptors(model, reference)
            detector = statistical.QuadraticDetector.fit(real, real[:0], [])
            prototype = decide.real_prototype(real)
            cal_scores = detector.scores(loaded.embed(statistical.with_jpeg_copies(cal_images, seed)))
            threshold, jpeg_threshold = _thresholds(cal_scores, cal_jpeg + [True] * len(cal_images), config.target_fpr)
        else:
            prototype = decide.real_prototype(loaded.embed(train_images))
            cal_scores = loaded.embed(cal_images) @ prototype
            threshold = decide.calibrate_real_threshold(cal_scores, config.target_fpr)
        calibration_ids = [ws.put_blob(decoded.raw[i]) for i in cal_idx]
        decider = decide.Decider(prototype, threshold, None, config.decision, config.k, config.top_k,
                                   quadratic=detector.to_dict() if closed_form else None, jpeg_threshold=jpeg_threshold)
        meta = {
            "kind": "pretrain",
            "parent": parent,
            "profile": config.profile,
            "fingerprint": config.fingerprint,
            "input": input_kind,
            "tiles": model.tiles,
            "data": {**_data_summary([decoded.image_ids[i] for i in train_idx], [training.REAL] * len(train_idx)),
                     "errors": len(decoded.errors)},
            "calibration": calibration_ids,
            # the paper's p_r for adaptation: the mean feature of the pre-training real images
            "pretraining_prototype": prototype.tolist(),
            "training": {**asdict(cfg), "resumed_from": start_epoch,
                         "objective": "closed-form" if closed_form else "classification" if cfg.labels else "contrastive"},
            "metrics": {"history": result["history"], "calibration_real_scores": {"count": len(cal_scores), "threshold": threshold}},
            "decider": decider.to_dict(),
        }
        version = publish(ws, model, meta, make_current=False)
        failpoints.reached("pretrain:published")
        carry_gallery(ws, parent, loaded, version)
        if before_current is not None:
            before_current(version)
        ws.set_current_model(version)
        if ws.exists(ws.run_path(f"pretrain-{key}")):  # no epoch ran (0 epochs): no run state was written
            ws.fs.rm(ws.path(ws.run_path(f"pretrain-{key}")), recursive=True)
    return {"model_version": version, "parent": parent, "images": len(train_idx), "calibration": len(cal_idx),
            "errors": decoded.errors, "threshold": threshold, "epochs": cfg.epochs}


# ---------------------------------------------------------------- gallery


def gallery_table(ws: Workspace, version: str) -> pa.Table:
    table = ws.read_parquet(TABLES, "gallery", f"model_version={version}")
    if table is None:
        return schemas.schema("gallery", 1).empty_table().drop(["embedding"])
    table = table.append_column("model_version", pa.array([version] * len(table)))
    # One row per (image, source): a re-added image keeps its first registration.
    seen, keep = set(), []
    for i, (image_id, source) in enumerate(zip(table["image_id"].to_pylist(), table["source"].to_pylist(), strict=True)):
        if (image_id, source) not in seen:
            seen.add((image_id, source))
            keep.append(i)
    return table.take(keep)


def write_gallery_rows(ws: Workspace, version: str, rows: list[dict], dim: int) -> None:
    if not rows:
        return
    table = schemas.validate(pa.Table.from_pylist(rows), "gallery", embedding_dim=dim)
    buffer = io.BytesIO()
    pq.write_table(table.drop(["model_version"]), buffer)
    ws.write_bytes(f"{TABLES}/gallery/model_version={version}/part-{uuid.uuid4().hex}.parquet", buffer.getvalue())


def check_source_name(source: str) -> str:
    if not _SOURCE_NAME.match(source) or source == training.UNKNOWN:
        raise WorkspaceError(f"invalid source name {source!r}: letters, digits and _ . + - (not 'unknown')")
    return source


def gallery_summary(ws: Workspace) -> dict:
    current = ws.require_model_version()
    table = gallery_table(ws, current)
    counts: dict[str, int] = {}
    for s in table["source"].to_pylist():
        counts[s] = counts.get(s, 0) + 1
    return {"model_version": current, "sources": dict(sorted(counts.items())), "images": len(table)}


def carry_gallery(ws: Workspace, parent: str, model: LoadedModel, version: str, images: list[np.ndarray] | None = None) -> int:
    """The parent version's gallery rows, re-embedded by `model`, written for `version`; returns how many."""
    table = gallery_table(ws, parent)
    if not len(table):
        return 0
    if images is None:
        images = gallery_images(ws, parent)[0]
    emb = model.embed(images)
    rows = [
        {**{k: table[k][i].as_py() for k in ("image_id", "uri", "source", "added_at")}, "model_version": version,
         "fingerprint": str(model.model.fingerprint), "embedding": emb[i].tolist()}
        for i in range(len(table))
    ]
    write_gallery_rows(ws, version, rows, model.model.embedding_dim)
    return len(rows)


def gallery_images(ws: Workspace, version: str) -> tuple[list[np.ndarray], list[str], list[str]]:
    table = gallery_table(ws, version)
    ids, sources = table["image_id"].to_pylist(), table["source"].to_pylist()
    return [decode_image(ws.get_blob(i), i).pixels for i in ids], sources, ids


# ---------------------------------------------------------------- adaptation


def _calibration_images(ws: Workspace, model: LoadedModel) -> tuple[list[np.ndarray], list[bool]]:
    """The held-out real images of pre-training and which are JPEG, with JPEG copies where the profile fits in closed form."""
    decoded = [decode_image(ws.get_blob(i), i) for i in model.meta.get("calibration") or []]
    images, jpeg = [d.pixels for d in decoded], [d.format in JPEG_FORMATS for d in decoded]
    if model.model.fit == "closed-form" and images:
        return statistical.with_jpeg_copies(images), jpeg + [True] * len(images)
    return images, jpeg


def _thresholds(scores: np.ndarray, jpeg: Sequence[bool], target_fpr: float) -> tuple[float, float | None]:
    """(threshold for other formats, threshold for JPEG inputs): each a conformal quantile of its own format's scores.

    One pooled threshold sat between the two populations: on the devset, real PNGs were called
    generated 1.5% of the time and real JPEGs 17.5%, at a 5% target. A format with no
    calibration image falls back to the pooled threshold.
    """
    scores, jpeg = np.asarray(scores, dtype=np.float64), np.asarray(jpeg, dtype=bool)
    pooled = decide.calibrate_real_threshold(scores, target_fpr)
    other = decide.calibrate_real_threshold(scores[~jpeg], target_fpr) if (~jpeg).any() else pooled
    return other, decide.calibrate_real_threshold(scores[jpeg], target_fpr) if jpeg.any() else None


def decider_for(model: LoadedModel, ws: Workspace, images, sources, config: WorkspaceConfig, fitted: dict | None = None) -> decide.Decider:
    """Prototype from the real gallery images; threshold from the held-out calibration images.

    With contrast detection the generator prototypes come from the same gallery images, and
    the threshold is calibrated on the calibration images' contrast scores. The quadratic rule
    (closed-form profiles) is fitted on `fitted`, the descriptors `statistical.fit_gallery` used.
    """
    rule = detection_method(config)
    calibration, calibration_jpeg = _calibration_images(ws, model)
    if rule == "quadratic":
        if fitted is None or not calibration:
            raise WorkspaceError(f"the quadratic detection rule needs a closed-form profile (srm) with 'lida pretrain' run first; "
                                 f"this workspace's profile is {config.profile} ('lida config detection none' restores its own rule)")
        real = statistical.embeddings_from_descriptors(model.model, fitted["real"])
        generated = statistical.embeddings_from_descriptors(model.model, fitted["generated"])
        detector = statistical.QuadraticDetector.fit(real, generated, fitted["labels"])
        found = decide.generator_prototypes(generated, fitted["labels"])
        threshold, jpeg_threshold = _thresholds(detector.scores(model.embed(calibration)), calibration_jpeg, config.target_fpr)
        return decide.Decider(decide.real_prototype(real), threshold, None, config.decision, config.k, config.top_k,
                                np.stack(list(found.values())) if found else None, quadratic=detector.to_dict(),
                                jpeg_threshold=jpeg_threshold)
    emb = model.embed(images)
    real = emb[np.asarray(sources) == training.REAL]
    prototype = decide.real_prototype(real)
    generators = None
    if calibration:
        if rule == "contrast":
            found = decide.generator_prototypes(emb, sources)
            generators = np.stack(list(found.values())) if found else None
        scores = decide.detection_scores(model.embed(calibration), prototype, generators)
    else:  # no held-out real images: the prototype rule, with leave-one-out gallery scores
        scores = decide.leave_one_out_similarities(real, [training.REAL] * len(real))
        scores = scores[np.isfinite(scores)]
    threshold = decide.calibrate_real_threshold(scores, config.target_fpr) if len(scores) else -1.0
    return decide.Decider(prototype, threshold, None, config.decision, config.k, config.top_k, generators)


def fit_model(model: LoadedModel, images, sources, cfg: training.AdaptConfig, progress: Progress) -> tuple[training.AdaptResult, dict | None]:
    """Adaptation in place: gradient descent, or the closed-form fit (which also returns what the detector needs)."""
    if model.model.fit == "closed-form":
        progress("fit", {"images": len(images)})
        return training.AdaptResult(), statistical.fit_gallery(model.model, images, sources, cfg.seed)
    return training.adapt(model.model, images, sources, cfg, progress=lambda e: progress("epoch", e),
                          pretraining_prototype=model.meta.get("pretraining_prototype")), None


def adapt_version(ws: Workspace, epochs: int | None = None, lr: float | None = None, seed: int = 0,
                  progress: Progress = quiet, lock: bool = True, before_current: Callable[[str], object] | None = None) -> dict:
    """Few-shot adaptation on the gallery -> candidate; promoted only if not worse on held-out images.

    A promoted candidate gets the gallery re-embedded and `before_current(version)` (the index
    rebuild) before models/CURRENT moves, so a kill at any step leaves scans working.

    `lock=False` when the caller holds the workspace lock (to rebuild the index under it too).
    """
    ws.require()
    config = ws.config()
    with ws.lock("adapt") if lock else contextlib.nullcontext():
        current = load_model(ws)
        images, sources, ids = gallery_images(ws, current.version)
        if training.REAL not in sources or len(set(sources)) < 2:
            raise WorkspaceError("adaptation needs real images and at least one generator in the gallery ('lida gallery add')")
        cfg = adapt_config(config.profile, epochs, lr, seed, current.input_kind)
        if cfg.prototype == "pretraining" and current.meta.get("pretraining_prototype") is None:
            # Loaded weights that were never pre-trained here (`lida init --weights`): the gallery's
            # real images stand in, and the model's training record says so (docs/method.md).
            cfg.prototype = "gallery"
        candidate = LoadedModel("candidate", copy.deepcopy(current.model), {**current.meta})
        train_idx, held_idx = training.split_holdout(sources, cfg.holdout, seed)
        before = training.holdout_accuracy(current.model, images, sources, train_idx, held_idx, current.input_kind)
        if candidate.model.fit == "closed-form":
            # The gate fits on the training split and scores the held-out images; the published
            # head is then refitted on the whole gallery (a fit has no epochs to stop early).
            gate = LoadedModel("gate", copy.deepcopy(current.model), current.meta)
            fit_model(gate, [images[i] for i in train_idx], [sources[i] for i in train_idx], cfg, progress)
            after = training.holdout_accuracy(gate.model, images, sources, train_idx, held_idx, current.input_kind)
            result, fitted = fit_model(candidate, images, sources, cfg, progress)
            result.best_holdout_accuracy = after
            decider = decider_for(candidate, ws, images, sources, config, fitted)
        else:
            result, _ = fit_model(candidate, images, sources, cfg, progress)
            after = result.best_holdout_accuracy
            decider = decider_for(candidate, ws, [images[i] for i in train_idx], [sources[i] for i in train_idx], config)
        promoted = bool(np.isnan(before) or (not np.isnan(after) and after >= before))
        meta = {
            **{k: v for k, v in current.meta.items()
               if k in ("profile", "fingerprint", "input", "tiles", "calibration", "pretraining_prototype")},
            "kind": "adapt",
            "parent": current.version,
            "data": _data_summary(ids, sources),
            "training": {**asdict(cfg), "best_epoch": result.best_epoch},
            "metrics": {"history": result.history, "holdout_accuracy_before": before, "holdout_accuracy_after": after,
                        "holdout_images": len(held_idx)},
            "promotion": {"promoted": promoted, "current_accuracy": before, "candidate_accuracy": after,
                          "rule": "candidate leave-out accuracy >= current"},
            "decider": decider.to_dict(),
        }
        version = publish(ws, candidate.model, meta, make_current=False)
        failpoints.reached("adapt:published")
        if promoted:
            # Re-embed the gallery for the new version before it becomes current.
            carry_gallery(ws, current.version, candidate, version, images)
            failpoints.reached("adapt:gallery")
            if before_current is not None:
                before_current(version)
            failpoints.reached("adapt:indexed")
            ws.set_current_model(version)
            failpoints.reached("adapt:current")
    return {"model_version": version, "parent": current.version, "promoted": promoted,
            "holdout_accuracy_before": before, "holdout_accuracy_after": after, "best_epoch": result.best_epoch}

"""Model lifecycle in a workspace: init, pre-train, adapt (gallery rows: `gallery.py`; evaluation: `evaluate.py`).

These are the verbs' logic without the command line. Every step that publishes holds the
workspace lock. A model version is published whole and `models/CURRENT` only moves after
it, so a crash (even kill -9) leaves the current model untouched and usable.

Over 400 lines on purpose: every step here makes a model version, and they share its meta
format and its decider's calibration; one file keeps a version's whole life readable in order.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from lida_core import decide, failpoints, gallery, statistical, training
from lida_core.decode import JPEG_FORMATS, decode_image, decode_inputs
from lida_core.embed import embed
from lida_core.inputs import labelled_folders, list_inputs
from lida_core.model import (
    CheckpointError,
    Embedder,
    build_model,
    checkpoint_bytes,
    get_profile,
    load_checkpoint,
    load_upstream_weights,
)
from lida_core.workspace import MODELS, Workspace, WorkspaceConfig, WorkspaceError, utc_now

Progress = Callable[[str, dict], None]
MIN_CALIBRATION = 8
ADVISED_REAL_IMAGES = 5  # fewer real gallery images and `lida adapt` advises more (`gallery_advice`)

def adapt_config(profile: str, epochs: int | None, lr: float | None, seed: int, input_kind: str,
                 holdout: float | None = None) -> training.AdaptConfig:
    """The profile's adaptation defaults (`model.Profile.adapt`), with the user's epochs, learning rate and held-out share where given."""
    defaults = dict(get_profile(profile).adapt)
    extra = {} if holdout is None else {"holdout": holdout}
    return training.AdaptConfig(**{**defaults, "epochs": epochs or defaults["epochs"], "lr": lr or defaults["lr"]},
                                seed=seed, input_kind=input_kind, **extra)


def detection_method(config: WorkspaceConfig) -> str:
    """The workspace's detection rule: its config's, else its profile's."""
    return config.detection or get_profile(config.profile).detection


def quiet(_: str, __: dict) -> None:
    return None


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
    try:
        settings = replace(get_profile(profile).fingerprint, **overrides)
    except ValueError as exc:  # an unknown profile: the registry (model.PROFILES) names the known ones
        raise WorkspaceError(str(exc)) from None
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
    defaults = get_profile(config.profile).pretrain
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
    uris, class_of = _pretraining_inputs(paths, cfg.labels)
    if len(uris) < 2 * MIN_CALIBRATION:
        raise WorkspaceError(f"pre-training needs at least {2 * MIN_CALIBRATION} real images, found {len(uris)}")
    closed_form = get_profile(config.profile).fit == "closed-form"  # one pass over the images: keep bytes, not pixels
    decoded = decode_inputs(uris, progress, keep_bytes=True, lazy=closed_form, jpeg_space=config.jpeg_space)
    if len(decoded.pixels) < 2 * MIN_CALIBRATION:
        raise WorkspaceError(f"only {len(decoded.pixels)} of {len(uris)} images could be decoded")
    # Calibration images, chosen by content hash (stable across runs). A trained network holds
    # out a slice; a closed-form fit keeps every image and cross-fits in folds dealt in this order.
    order = sorted(range(len(decoded.pixels)), key=lambda i: hashlib.sha256((decoded.image_ids[i] + str(seed)).encode()).hexdigest())
    if closed_form:
        fold_of = np.empty(len(order), np.int64)
        fold_of[order] = np.arange(len(order)) % statistical.CALIBRATION_FOLDS
        cal_idx, train_idx = [], list(range(len(order)))
    else:
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
    cross_fit = None  # a closed-form fit's reference rows: their descriptors, folds and formats
    with ws.lock("pretrain"):
        if closed_form:  # a fixed stem: keep the real descriptors and fit the head on them, no epochs
            progress("fit", {"images": len(train_images)})
            _, rows = statistical.fit_pretrain(model, train_images, seed)
            image = rows % len(train_idx)  # rows: the images, then their JPEG copies
            progress("calibration copies", {"qualities": list(statistical.CALIBRATION_QUALITIES),
                                            "images": min(len(train_idx), statistical.MAX_CALIBRATION_IMAGES)})
            copies, copy_image, copy_quality = statistical.calibration_copies(model, train_images, seed)
            copy_side = np.zeros(len(copies), np.int64)
            sides = statistical.size_sides(model)
            if sides:  # crops of the same photographs at smaller sides: a threshold for small images
                progress("size copies", {"sides": list(sides), "images": min(len(train_idx), statistical.MAX_CALIBRATION_IMAGES)})
                crops, crop_image, crop_side, crop_quality = statistical.size_copies(model, train_images, seed)
                copies, copy_image = np.vstack([copies, crops]), np.concatenate([copy_image, crop_image])
                copy_quality, copy_side = np.concatenate([copy_quality, crop_quality]), np.concatenate([copy_side, crop_side])
            statistical.keep_calibration(model, copies)
            cross_fit = {"reference": statistical.reference_descriptors(model), "folds": fold_of[image],
                         "jpeg": (rows >= len(train_idx)) | np.asarray(decoded.jpeg, dtype=bool)[image],
                         "calibration": statistical.calibration_descriptors(model), "calibration_folds": fold_of[copy_image],
                         "calibration_quality": copy_quality, "calibration_side": copy_side}
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
        if cross_fit is not None:
            progress("calibrate", {"folds": statistical.CALIBRATION_FOLDS, "images": len(train_idx)})
            decider, cal_scores = _quadratic_decider(loaded, config, None, cross_fit=cross_fit)
        else:
            decider, cal_scores = _pretraining_decider(loaded, config, train_images, [decoded.pixels[i] for i in cal_idx],
                                                       [decoded.jpeg[i] for i in cal_idx])
        prototype, threshold = decider.prototype, decider.real_threshold
        calibration_ids = [ws.put_blob(decoded.raw[i]) for i in cal_idx]
        meta = {
            "kind": "pretrain",
            "parent": parent,
            "profile": config.profile,
            "fingerprint": config.fingerprint,
            "input": input_kind,
            "tiles": model.tiles,
            "data": {**_data_summary([decoded.image_ids[i] for i in train_idx], [decide.REAL] * len(train_idx)),
                     "errors": len(decoded.errors)},
            "calibration": calibration_ids,
            **({"cross_fit": {"folds": cross_fit["folds"].tolist(), "jpeg": cross_fit["jpeg"].tolist(),
                              "calibration": {"folds": cross_fit["calibration_folds"].tolist(),
                                              "quality": cross_fit["calibration_quality"].tolist(),
                                              "side": cross_fit["calibration_side"].tolist()}}} if cross_fit else {}),
            # the paper's p_r for adaptation: the mean feature of the pre-training real images
            "pretraining_prototype": prototype.tolist(),
            "training": {**asdict(cfg), "resumed_from": start_epoch,
                         "objective": "closed-form" if closed_form else "classification" if cfg.labels else "contrastive"},
            "metrics": {"history": result["history"], "calibration_real_scores": {"count": len(cal_scores), "threshold": threshold}},
            "decider": decider.to_dict(),
        }
        version = publish(ws, model, meta, make_current=False)
        failpoints.reached("pretrain:published")
        gallery.carry(ws, parent, loaded, version)
        if before_current is not None:
            before_current(version)
        ws.set_current_model(version)
        if ws.exists(ws.run_path(f"pretrain-{key}")):  # no epoch ran (0 epochs): no run state was written
            ws.fs.rm(ws.path(ws.run_path(f"pretrain-{key}")), recursive=True)
    return {"model_version": version, "parent": parent, "images": len(train_idx),
            "calibration": len(train_idx) if cross_fit else len(cal_idx),
            "calibration_folds": statistical.CALIBRATION_FOLDS if cross_fit else None,
            "errors": decoded.errors, "threshold": threshold, "epochs": cfg.epochs}


def _pretraining_inputs(paths: Sequence[str], labelled: bool) -> tuple[list[str], dict[str, int] | None]:
    """Pre-training's image URIs, and each one's class when `--labels folders` names one sub-folder per class."""
    if not labelled:
        return list_inputs(paths), None
    if len(paths) != 1:
        raise WorkspaceError("--labels folders takes exactly one folder with one sub-folder per class")
    groups = labelled_folders(paths[0])
    return [u for files in groups.values() for u in files], {u: i for i, files in enumerate(groups.values()) for u in files}


def _pretraining_decider(loaded: LoadedModel, config: WorkspaceConfig, train_images, cal_images,
                         cal_jpeg: list[bool]) -> tuple[decide.Decider, np.ndarray]:
    """A pre-trained network's decider: similarity to the real prototype, its threshold from the held-out images."""
    prototype = decide.real_prototype(loaded.embed(train_images))
    scores = loaded.embed(cal_images) @ prototype
    return decide.Decider(prototype, decide.calibrate_real_threshold(scores, config.target_fpr), None, config.decision,
                          config.k, config.top_k), scores


def _quadratic_decider(model: LoadedModel, config: WorkspaceConfig, fitted: dict | None, cross_fit: dict | None = None,
                       held_out: tuple[Sequence[np.ndarray], list[bool]] | None = None,
                       keys: Sequence[str] | None = None) -> tuple[decide.Decider, np.ndarray]:
    """The quadratic rule on the current head, one threshold per format; and the calibration scores.

    `fitted`: what `statistical.fit_gallery` fitted (the reference rows first, then the
    gallery's real images; the generated ones), or None after pre-training (the real side
    alone). The thresholds are conformal quantiles of each format's calibration scores: with
    `cross_fit` (the model's reference rows, their folds and formats, and its per-quality
    calibration copies with theirs), each row scored by a fit without its fold, and one JPEG
    threshold per quality from the copies; with `held_out` (images and which are JPEG; srm
    models pre-trained before session 16), those images scored by this fit. `keys`: the fitted
    gallery images' `decide.image_key`s, in the fit's order, which name the JPEG view's images
    for retrieval (`Decider.jpeg_gallery`).
    """
    if fitted is None:  # pre-training: the real side alone
        fitted = {"real": cross_fit["reference"], "generated": cross_fit["reference"][:0], "labels": np.array([], dtype=str)}
    real = statistical.embeddings_from_descriptors(model.model, fitted["real"])
    generated = statistical.embeddings_from_descriptors(model.model, fitted["generated"])
    detector = statistical.QuadraticDetector.fit(real, generated, fitted["labels"])
    view = fitted.get("jpeg_generated")
    jpeg_detector, jpeg_unknown, jpeg_gallery = None, None, None
    if view is not None and len(view):  # a gallery with generators' PNGs: JPEG queries meet its JPEG view (`statistical.jpeg_view`)
        view_emb = statistical.embeddings_from_descriptors(model.model, view)
        jpeg_detector = statistical.QuadraticDetector.fit(real, view_emb, fitted["jpeg_labels"])
        jpeg_unknown = _jpeg_unknown_distance(jpeg_detector, view_emb, fitted["jpeg_labels"], fitted["jpeg_images"],
                                              config.unknown_accept)
        if keys is not None:  # retrieval meets the real images' JPEG rows too (models fitted before session 27 have none)
            real_view = fitted.get("jpeg_real", view[:0])
            jpeg_gallery = _jpeg_gallery(
                np.vstack([view_emb, statistical.embeddings_from_descriptors(model.model, real_view)]),
                np.concatenate([fitted["jpeg_labels"], np.full(len(real_view), decide.REAL)]),
                np.concatenate([fitted["jpeg_images"], fitted.get("jpeg_real_images", np.zeros(0, np.int64))]), keys)
    if cross_fit is not None:
        reference = cross_fit["reference"]
        if not np.array_equal(fitted["real"][: len(reference)], reference):
            raise WorkspaceError("the closed-form fit does not start with the model's reference rows; re-run 'lida pretrain'")
        scored = statistical.cross_fitted_scores(
            reference, cross_fit["folds"], fitted["real"][len(reference):], fitted["generated"], fitted["labels"],
            model.model.embedding_dim, cross_fit["calibration"], cross_fit["calibration_folds"],
            jpeg_view=None if jpeg_detector is None else (view, fitted["jpeg_labels"]))
        scores, copy_scores = scored[:2]
        jpeg_copy_scores = copy_scores
        jpeg = cross_fit["jpeg"]
        if jpeg_detector is not None:  # JPEG rows and copies are judged by the JPEG view's rule, so calibrated under it
            scores = np.where(jpeg, scored[2], scores)
            jpeg_copy_scores = scored[3]
        quality = cross_fit["calibration_quality"]
        side = cross_fit.get("calibration_side", np.zeros(len(quality), np.int64))
        whole = side == 0

        def per(values: np.ndarray, rows: np.ndarray, scored_by: np.ndarray) -> dict[int, float] | None:
            return {int(v): decide.calibrate_real_threshold(scored_by[rows & (values == v)], config.target_fpr)
                    for v in np.unique(values[rows])} or None

        jpeg_thresholds = per(quality, whole, jpeg_copy_scores)
        size_thresholds = per(side, ~whole & (quality == 0), copy_scores)  # crops kept as they are: PNG-like inputs
        jpeg_size_thresholds = per(side, ~whole & (quality > 0), jpeg_copy_scores)
    else:
        images, jpeg = held_out
        embedded = model.embed(images)
        scores = detector.scores(embedded)
        if jpeg_detector is not None:
            scores = np.where(jpeg, jpeg_detector.scores(embedded), scores)
        jpeg_thresholds = size_thresholds = jpeg_size_thresholds = None
    found = decide.generator_prototypes(generated, fitted["labels"])
    threshold, jpeg_threshold = _thresholds(scores, jpeg, config.target_fpr)
    return decide.Decider(decide.real_prototype(real), threshold, None, config.decision, config.k, config.top_k,
                          np.stack(list(found.values())) if found else None, quadratic=detector.to_dict(),
                          jpeg_threshold=jpeg_threshold, jpeg_thresholds=jpeg_thresholds,
                          quadratic_jpeg=None if jpeg_detector is None else jpeg_detector.to_dict(),
                          jpeg_unknown_distance=jpeg_unknown, jpeg_gallery=jpeg_gallery,
                          size_thresholds=size_thresholds, jpeg_size_thresholds=jpeg_size_thresholds,
                          view_size=model.model.fingerprint.size if size_thresholds or jpeg_size_thresholds else None), scores


def _jpeg_gallery(view: np.ndarray, labels: np.ndarray, images: np.ndarray, keys: Sequence[str]) -> dict:
    """`Decider.jpeg_gallery`: the JPEG view's rows (embeddings), each with its gallery image (an index into its keys).

    Every row is kept (one per calibrated quality of a PNG, two for a JPEG file), and a query meets an
    image through its best row: on the devset that gave JPEG 90 queries Rank-1 0.572 against a PNG
    gallery, the rows' normalised mean 0.532 and the PNGs themselves 0.491 (docs/results.md, session 26).
    The values are rounded to 6 decimals (unit vectors: similarities move by about 1e-6): a row then
    costs about 2.7 KB of the model's indented meta.json (the devset's 25 generator PNGs, 150 rows:
    +0.4 MB on 1.6 MB), about half what full precision would.
    """
    labels, images = np.asarray(labels), np.asarray(images)
    owners, first, rows_image = np.unique(images, return_index=True, return_inverse=True)
    return {"keys": [keys[i] for i in owners], "sources": [str(s) for s in labels[first]],
            "images": rows_image.tolist(), "embeddings": np.round(np.asarray(view, dtype=np.float64), 6).tolist()}


def _jpeg_unknown_distance(detector, view: np.ndarray, labels: np.ndarray, images: np.ndarray, accept: float) -> float | None:
    """Distance to the nearest generator mean past which a JPEG query is `unknown`: keeps `accept` of known ones.

    Leave-one-image-out, as `decide.calibrate_unknown_threshold` is for the index: each gallery image's JPEG rows
    against its generator's mean without that image's rows. None when no generator has two images.
    """
    labels, images = np.asarray(labels), np.asarray(images)
    distances = []
    for image in np.unique(images):
        own = images == image
        rest = (labels == labels[own][0]) & ~own
        if not rest.any():
            continue
        distances += detector.generator_distances(view[own], view[rest].mean(0))[:, 0].tolist()
    return float(np.quantile(distances, accept)) if distances else None


def _cross_fit(model: LoadedModel) -> dict | None:
    """The model's reference rows with their folds and formats, when its pre-training cross-fitted them (else None)."""
    record = model.meta.get("cross_fit")
    if not isinstance(record, dict) or model.model.fit != "closed-form":
        return None
    reference = statistical.reference_descriptors(model.model)
    folds, jpeg = np.asarray(record.get("folds", []), dtype=np.int64), np.asarray(record.get("jpeg", []), dtype=bool)
    if not (len(folds) == len(jpeg) == len(reference)):
        raise WorkspaceError(f"model {model.version}: its calibration record covers {len(folds)} rows, its reference "
                             f"{len(reference)}; re-run 'lida pretrain'")
    # per-quality calibration copies (absent from models pre-trained before session 20: one JPEG threshold)
    copies = statistical.calibration_descriptors(model.model)
    calibration = record.get("calibration") if isinstance(record.get("calibration"), dict) else {}
    copy_folds = np.asarray(calibration.get("folds", []), dtype=np.int64)
    copy_quality = np.asarray(calibration.get("quality", []), dtype=np.int64)
    # each copy's crop side: 0 for a copy of the whole image (models pre-trained before session 29 have no crops)
    copy_side = np.asarray(calibration.get("side", np.zeros(len(copy_quality))), dtype=np.int64)
    if not (len(copy_folds) == len(copy_quality) == len(copy_side) == len(copies)) or not np.isin(copy_folds, folds).all():
        raise WorkspaceError(f"model {model.version}: its per-quality calibration record covers {len(copy_folds)} rows, "
                             f"its copies {len(copies)}; re-run 'lida pretrain'")
    return {"reference": reference, "folds": folds, "jpeg": jpeg, "calibration": copies, "calibration_folds": copy_folds,
            "calibration_quality": copy_quality, "calibration_side": copy_side}


# ---------------------------------------------------------------- adaptation


def _calibration_images(ws: Workspace, model: LoadedModel) -> tuple[list[np.ndarray], list[bool]]:
    """The held-out real images of pre-training and which are JPEG, with JPEG copies where the profile fits in closed form."""
    space = model.model.fingerprint.jpeg
    decoded = [decode_image(ws.get_blob(i), i, jpeg_space=space) for i in model.meta.get("calibration") or []]
    images, jpeg = [d.pixels for d in decoded], [d.format in JPEG_FORMATS for d in decoded]
    if model.model.fit == "closed-form" and images:
        return statistical.with_jpeg_copies(images, jpeg_space=space), jpeg + [True] * len(images)
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


def decider_for(model: LoadedModel, ws: Workspace, images, sources, config: WorkspaceConfig, fitted: dict | None = None,
                keys: Sequence[str] | None = None) -> decide.Decider:
    """Prototype from the real gallery images; threshold from the held-out calibration images.

    `keys` name the images (`decide.image_key`) for a closed-form fit's JPEG view (`Decider.jpeg_gallery`).

    With contrast detection the generator prototypes come from the same gallery images, and
    the threshold is calibrated on the calibration images' contrast scores. The quadratic rule
    (closed-form profiles) is fitted on `fitted`, the descriptors `statistical.fit_gallery` used.
    """
    rule = detection_method(config)
    cross_fit = _cross_fit(model)
    if rule == "quadratic" and fitted is not None and cross_fit is not None:
        return _quadratic_decider(model, config, fitted, cross_fit=cross_fit, keys=keys)[0]
    calibration, calibration_jpeg = _calibration_images(ws, model)  # a held-out slice (networks; srm before session 16)
    if rule == "quadratic":
        if fitted is None or not calibration:
            raise WorkspaceError(f"the quadratic detection rule needs a closed-form profile (srm) with 'lida pretrain' run first; "
                                 f"this workspace's profile is {config.profile} ('lida config detection none' restores its own rule)")
        return _quadratic_decider(model, config, fitted, held_out=(calibration, calibration_jpeg))[0]
    emb = model.embed(images)
    real = emb[np.asarray(sources) == decide.REAL]
    prototype = decide.real_prototype(real)
    generators = None
    if calibration:
        if rule == "contrast":
            found = decide.generator_prototypes(emb, sources)
            generators = np.stack(list(found.values())) if found else None
        scores = decide.detection_scores(model.embed(calibration), prototype, generators)
    else:  # no held-out real images: the prototype rule, with leave-one-out gallery scores
        scores = decide.leave_one_out_similarities(real, [decide.REAL] * len(real))
        scores = scores[np.isfinite(scores)]
    threshold = decide.calibrate_real_threshold(scores, config.target_fpr) if len(scores) else -1.0
    return decide.Decider(prototype, threshold, None, config.decision, config.k, config.top_k, generators)


def fit_model(model: LoadedModel, images, sources, cfg: training.AdaptConfig, progress: Progress,
              split: tuple[list[int], list[int]] | None = None, detector: bool = True) -> tuple[training.AdaptResult, dict | None]:
    """Adaptation in place: gradient descent (on `split`'s training images), or the closed-form fit
    (on all of them; it also returns what the detector needs, with its JPEG view unless `detector` is False:
    the promotion gate's fold fits judge retrieval alone)."""
    if model.model.fit == "closed-form":
        progress("fit", {"images": len(images)})
        return training.AdaptResult(), statistical.fit_gallery(model.model, images, sources, cfg.seed, with_jpeg_view=detector)
    return training.adapt(model.model, images, sources, cfg, progress=lambda e: progress("epoch", e),
                          pretraining_prototype=model.meta.get("pretraining_prototype"), split=split), None


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
        images, sources, ids = gallery.images(ws, current.version)
        if decide.REAL not in sources or len(set(sources)) < 2:
            raise WorkspaceError("adaptation needs real images and at least one generator in the gallery ('lida gallery add')")
        cfg = adapt_config(config.profile, epochs, lr, seed, current.input_kind)
        if cfg.prototype == "pretraining" and current.meta.get("pretraining_prototype") is None:
            # Loaded weights that were never pre-trained here (`lida init --weights`): the gallery's
            # real images stand in, and the model's training record says so (docs/method.md).
            cfg.prototype = "gallery"
        candidate = LoadedModel("candidate", copy.deepcopy(current.model), {**current.meta})
        fitted_before = _fitted_images(current)
        keys = [decide.image_key(s, i) for s, i in zip(sources, ids, strict=True)]  # as fits record the images they saw
        if candidate.model.fit == "closed-form":
            # The gate is cross-fitted: per fold, a head fitted on the rest scores the held-out
            # images, and every gallery image is held out once; the current model scores the
            # same folds. One split (one image per source at 5 shots) made promotion a coin flip
            # (the demo's candidate lost 6 of 7 against 7 of 7). The published head is then
            # refitted on the whole gallery (a fit has no epochs to stop early).
            # The current model is judged out of sample too: on a fold holding out images it was
            # fitted on, its own fit is repeated without them (on the fold's training images it
            # had). Judged as it stands, it would have seen those images, and a gallery that grew
            # (a generator added) kept the stale model: on the devset, 0.767 in-sample against a
            # candidate's 0.733 out-of-sample (docs/results.md, session 21). A fold that leaves it
            # none of them judges its fit on no gallery image, the pre-trained state.
            hits_before = hits_after = 0.0
            held_idx = []
            for fold_train, fold_held in training.holdout_folds(sources, cfg.holdout, seed):
                gate = LoadedModel("gate", copy.deepcopy(current.model), current.meta)
                fit_model(gate, [images[i] for i in fold_train], [sources[i] for i in fold_train], cfg, progress, detector=False)
                judged = current.model
                if fitted_before is not None and any(keys[i] in fitted_before for i in fold_held):
                    had = [i for i in fold_train if keys[i] in fitted_before]
                    if had == fold_train:  # it had every training image of the fold: its fit is the candidate's
                        judged = gate.model
                    else:
                        judged = LoadedModel("gate-current", copy.deepcopy(current.model), current.meta)
                        fit_model(judged, [images[i] for i in had], [sources[i] for i in had], cfg, progress, detector=False)
                        judged = judged.model
                hits_before += len(fold_held) * training.holdout_accuracy(judged, images, sources, fold_train, fold_held,
                                                                          current.input_kind)
                hits_after += len(fold_held) * training.holdout_accuracy(gate.model, images, sources, fold_train, fold_held,
                                                                         current.input_kind)
                held_idx += fold_held
            before = hits_before / len(held_idx) if held_idx else float("nan")
            after = hits_after / len(held_idx) if held_idx else float("nan")
            result, fitted = fit_model(candidate, images, sources, cfg, progress)
            result.best_holdout_accuracy = after
            decider = decider_for(candidate, ws, images, sources, config, fitted, keys)
            in_sample = None if fitted_before is None else 0  # its images are refitted without, fold by fold
        else:
            # A network is trained on a split of the gallery and stops at its best epoch on the rest.
            # The candidate starts from the current weights, which it keeps if no epoch does better,
            # so the gate is the current model's figure against the candidate's on the same held-out
            # images. Those are drawn first from images the current model was not trained on (a
            # gallery that grew reshuffles every source's split): judged and early-stopped on images
            # it had trained on, the current model would look better than it is.
            unseen = None if fitted_before is None else [k not in fitted_before for k in keys]
            train_idx, held_idx = training.split_holdout(sources, cfg.holdout, seed, prefer=unseen)
            before = training.holdout_accuracy(current.model, images, sources, train_idx, held_idx, current.input_kind)
            in_sample = None if unseen is None else sum(not unseen[i] for i in held_idx)
            result, _ = fit_model(candidate, images, sources, cfg, progress, split=(train_idx, held_idx))
            after = result.best_holdout_accuracy
            decider = decider_for(candidate, ws, [images[i] for i in train_idx], [sources[i] for i in train_idx], config)
        # A closed-form model that was only pre-trained has no generator side in its detector: it
        # can call an image atypical of photographs, not name its source (the demo's scan with
        # one attributed 14% of its images rightly). Its leave-out retrieval is not what a user
        # reads, so the first gallery fit is promoted; later ones face the gate, but for the cases below.
        first_fit = candidate.model.fit == "closed-form" and current.meta.get("kind") != "adapt"
        # For the same reason, a gallery that gained a generator the current closed-form model was
        # not fitted on gets the refit: the current detector has no side for that generator, and on
        # the devset it called every image of the new generators real, whatever its leave-out
        # retrieval (docs/results.md, session 21).
        unfitted = sorted(set(sources) - set((current.meta.get("data") or {}).get("sources") or {}) - {decide.REAL})
        new_source = candidate.model.fit == "closed-form" and current.meta.get("kind") == "adapt" and bool(unfitted)
        # A closed-form refit on the very gallery the current model was fitted on (a rerun, say
        # after a kill): the current model has seen every held-out image, so its leave-out
        # accuracy is in-sample and the out-of-sample candidate cannot match it; the fit has no
        # hyperparameters to have got wrong, and it is the same procedure on the same images.
        data = _data_summary(ids, sources)
        # which images this fit was trained on (a closed-form fit: all; a network: its training split),
        # so the next gate can judge it on others
        trained_idx = range(len(ids)) if candidate.model.fit == "closed-form" else train_idx
        data["images"] = sorted(keys[i] for i in trained_idx)
        refit = (candidate.model.fit == "closed-form" and current.meta.get("kind") == "adapt"
                 and (current.meta.get("data") or {}).get("content_sha256") == data["content_sha256"])
        promoted = bool(first_fit or new_source or refit or np.isnan(before) or (not np.isnan(after) and after >= before))
        rule = ("first gallery fit of a pre-trained closed-form model" if first_fit
                else f"closed-form fit of generators the current model was not fitted on: {', '.join(unfitted)}" if new_source
                else "closed-form refit on the gallery the current model was fitted on" if refit
                else "candidate leave-out accuracy >= current, both out of sample" if in_sample == 0 and candidate.model.fit == "closed-form"
                else "candidate leave-out accuracy >= current, on images neither was trained on" if in_sample == 0
                else "candidate leave-out accuracy >= current")
        meta = {
            **{k: v for k, v in current.meta.items()
               if k in ("profile", "fingerprint", "input", "tiles", "calibration", "cross_fit", "pretraining_prototype")},
            "kind": "adapt",
            "parent": current.version,
            "data": data,
            "training": {**asdict(cfg), "best_epoch": result.best_epoch},
            "metrics": {"history": result.history, "holdout_accuracy_before": before, "holdout_accuracy_after": after,
                        "holdout_images": len(held_idx), "holdout_images_current_trained_on": in_sample},
            "promotion": {"promoted": promoted, "current_accuracy": before, "candidate_accuracy": after, "rule": rule},
            "decider": decider.to_dict(),
        }
        version = publish(ws, candidate.model, meta, make_current=False)
        failpoints.reached("adapt:published")
        if promoted:
            # Re-embed the gallery for the new version before it becomes current.
            gallery.carry(ws, current.version, candidate, version, images)
            failpoints.reached("adapt:gallery")
            if before_current is not None:
                before_current(version)
            failpoints.reached("adapt:indexed")
            ws.set_current_model(version)
            failpoints.reached("adapt:current")
    return {"model_version": version, "parent": current.version, "promoted": promoted, "rule": rule,
            "holdout_accuracy_before": before, "holdout_accuracy_after": after, "best_epoch": result.best_epoch,
            "advice": gallery_advice(sources)}


def gallery_advice(sources: Sequence[str]) -> list[str]:
    """What a gallery lacks for its decisions to hold, as lines for the user (none when it lacks nothing).

    Detection leans on the gallery's real photographs more than on its generators: the threshold is
    calibrated on the pre-training photographs, and photographs unlike them look generated unless the
    gallery shows some. On the devset, one shot per generator with one real image flagged 19% of the
    photographs of collections pre-training had not seen; with five real images 5.1%, with ten 4.2%
    (docs/results.md, session 27).
    """
    real = sum(s == decide.REAL for s in sources)
    if real >= ADVISED_REAL_IMAGES:
        return []
    return [f"the gallery holds {real} real image{'s' if real != 1 else ''}: real photographs unlike the pre-training ones "
            f"are more often called generated with fewer than {ADVISED_REAL_IMAGES} (on the devset, 19% with 1 and 5% with 5); "
            f"register photographs from the corpus you scan: lida gallery add --source real PATH..."]


def _fitted_images(model: LoadedModel) -> set[str] | None:
    """The gallery images (`decide.image_key`) a model was fitted on; None when it does not say.

    A model that was not adapted (pre-trained, initialised) was fitted on none. A closed-form fit
    records its whole gallery (since session 21), a network its training split (since session
    22); models adapted before recorded only a digest of their gallery.
    """
    if model.meta.get("kind") != "adapt":
        return set()
    recorded = (model.meta.get("data") or {}).get("images")
    if not isinstance(recorded, list) or not all(isinstance(k, str) for k in recorded):
        return None
    return set(recorded)


def adapt_and_reindex(ws: Workspace, epochs: int | None = None, lr: float | None = None, seed: int = 0,
                      progress: Progress = quiet) -> dict:
    """`lida adapt`: one lock over adaptation and the index rebuild, so no scan sees the new model before its index."""
    ws.require()
    with ws.lock("adapt"):
        built = {}
        result = adapt_version(ws, epochs, lr, seed, progress, lock=False,
                               before_current=lambda version: built.update(gallery.reindex(ws, version)))
        if result["promoted"]:
            result["index"] = built
    return result

"""`lida eval`: K-shot evaluation of the workspace's model on labelled folders, and its robustness runs.

K gallery images per source (or GenImage's train split) are fitted or adapted on, the rest
(or the val split) are the queries; Rank-1, mAP, the decisions' accuracy, detection, per-source
and confusion tables; each `--perturb` re-scores the same queries perturbed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from lida_core import decide
from lida_core.decode import decode_inputs
from lida_core.inputs import genimage_folders, labelled_folders
from lida_core.lifecycle import (
    LoadedModel,
    Progress,
    adapt_config,
    decider_for,
    fit_model,
    load_model,
    quiet,
)
from lida_core.metrics import auroc, balanced_accuracy, confusion_matrix, per_source_table, retrieval_metrics
from lida_core.perturb import Perturbation
from lida_core.workspace import EVALS, Workspace, WorkspaceError, utc_stamp


def _draw(directory: str, shots: int, seed: int, max_queries: int | None,
          real_shots: int | None = None) -> tuple[list, list, list, list, str]:
    """(gallery URIs, their sources, query URIs, their sources, layout) for a K-shot evaluation of DIR.

    One sub-folder per source: K images of each are the gallery, the rest the queries. GenImage's
    layout (<generator>/{train,val}/{ai,nature}): K of each source's `train` images are the
    gallery and its `val` images the queries (both from `val` where there is no `train`).
    `real_shots`: the real source's K, when it differs (each source's draw is the same either way).
    """
    splits = genimage_folders(directory)
    if splits is None:
        bank, held, layout = labelled_folders(directory), None, "folders"
    else:
        if "val" not in splits:
            raise WorkspaceError(f"{directory}: GenImage layout without a val split")
        layout = "genimage"
        bank, held = (splits["train"], splits["val"]) if "train" in splits else (splits["val"], None)
        if held is not None and set(held) - set(bank):
            raise WorkspaceError(f"{directory}: {', '.join(sorted(set(held) - set(bank)))}: val images without train images")
    if decide.REAL not in bank:
        raise WorkspaceError(f"{directory}: needs a 'real' sub-folder" if layout == "folders" else f"{directory}: no nature images")
    rng = np.random.default_rng(seed)
    gallery_uris, gallery_src, pools = [], [], {}
    for source, files in bank.items():
        files = list(files)
        rng.shuffle(files)
        k, option = (real_shots, "--real-shots") if source == decide.REAL and real_shots is not None else (shots, "--shots")
        if len(files) < k + (held is None):
            raise WorkspaceError(f"{directory}/{source}: {len(files)} images, need "
                                 f"{'more than' if held is None else 'at least'} {option} {k}")
        gallery_uris += files[:k]
        gallery_src += [source] * k
        pools[source] = files[k:]
    if held is not None:
        pools = {}
        for source, files in held.items():
            files = list(files)
            rng.shuffle(files)
            pools[source] = files
    query_uris, query_src = [], []
    for source, files in pools.items():
        files = files[:max_queries] if max_queries else files
        query_uris += files
        query_src += [source] * len(files)
    return gallery_uris, gallery_src, query_uris, query_src, layout


def _scores(decider: decide.Decider, q_emb: np.ndarray, q_src: list[str], g_emb: np.ndarray, g_src: list[str],
            jpeg: Sequence[bool], quality: Sequence[int | None], g_keys: Sequence[str] | None = None,
            dims: Sequence[tuple[int, int]] | None = None) -> tuple[dict, list[dict]]:
    """Retrieval and decision metrics of these query embeddings, and the decisions themselves.

    A JPEG query meets the gallery as the decider's JPEG view has it (`Decider.jpeg_gallery`, the
    images named by `g_keys`), in its retrieval figures as in its decision.
    """
    sims = decider.similarities(q_emb, g_emb, jpeg, g_keys)
    retrieval = retrieval_metrics(sims, q_src, g_src)
    decisions = decider.decide(q_emb, g_emb, g_src, jpeg, quality, g_keys, similarities=sims, dims=dims)
    predicted = [d["predicted_source"] for d in decisions]
    truth_generated = [s != decide.REAL for s in q_src]
    real_scores = np.array([d["real_score"] for d in decisions])
    return {
        "rank1": retrieval["rank1"],
        "mAP": retrieval["mAP"],
        "attribution_accuracy": float(np.mean([p == t for p, t in zip(predicted, q_src, strict=True)])),
        "balanced_accuracy": balanced_accuracy(truth_generated, [d["is_generated"] for d in decisions]),
        # Real queries called generated, at the threshold calibrated on pre-training's held-out images.
        "false_positive_rate": float(np.mean([d["is_generated"] for d, t in zip(decisions, q_src, strict=True) if t == decide.REAL]))
        if decide.REAL in q_src else float("nan"),
        "auroc": auroc(-real_scores, truth_generated),
    }, decisions


def _decision_rows(uris: list[str], sources: list[str], decisions: list[dict]) -> list[dict]:
    """Each query's decision as `lida eval` reports it (the clean run's and each perturbed run's)."""
    return [{"uri": u, "source": t, "predicted_source": d["predicted_source"], "is_generated": d["is_generated"],
             "real_score": d["real_score"], "top1_similarity": d["top1_similarity"]}
            for u, t, d in zip(uris, sources, decisions, strict=True)]


def evaluate(
    ws: Workspace,
    directory: str,
    shots: int = 5,
    seed: int = 0,
    adapt: bool = True,
    input_kind: str | None = None,
    epochs: int | None = None,
    progress: Progress = quiet,
    perturbations: Sequence[Perturbation] = (),
    max_queries: int | None = None,
    holdout: float | None = None,
    real_shots: int | None = None,
) -> dict:
    """K-shot evaluation on DIR/<source>/... (or GenImage's layout; `_draw`), then each perturbation of the queries.

    The gallery and the fit stay clean; each perturbation re-scores the same queries
    (`lida_core.perturb`: the paper's robustness runs).
    """
    config = ws.config()
    current = load_model(ws)
    if input_kind and input_kind != current.input_kind:
        raise WorkspaceError(
            f"the current model takes {current.input_kind} input; evaluate {input_kind} input in a workspace "
            f"pre-trained with 'lida pretrain --input {input_kind}'"
        )
    gallery_uris, gallery_src, query_uris, query_src, layout = _draw(directory, shots, seed, max_queries, real_shots)
    space = current.model.fingerprint.jpeg  # a JPEG read as the model reads it (lida_core.decode)
    gallery = decode_inputs(gallery_uris, progress, jpeg_space=space)
    queries = decode_inputs(query_uris, progress, jpeg_space=space)
    g_src = [s for s, u in zip(gallery_src, gallery_uris, strict=True) if u in set(gallery.uris)]
    g_keys = [decide.image_key(s, u) for s, u in zip(g_src, gallery.uris, strict=True)]  # each gallery image, by its source and uri
    q_src = [s for s, u in zip(query_src, query_uris, strict=True) if u in set(queries.uris)]
    model = LoadedModel(current.version, copy.deepcopy(current.model), current.meta)
    adapt_info, fitted = None, None
    if adapt:
        cfg = adapt_config(config.profile, epochs, None, seed, model.input_kind, holdout)
        result, fitted = fit_model(model, gallery.pixels, g_src, cfg, progress)
        adapt_info = {"best_epoch": result.best_epoch, "holdout_accuracy": result.best_holdout_accuracy,
                      "fit": model.model.fit}
    g_emb = model.embed(gallery.pixels)
    q_emb = model.embed(queries.pixels)
    decider = decider_for(model, ws, gallery.pixels, g_src, config, fitted, g_keys) if adapt or current.decider is None else current.decider
    decider = replace(decider, unknown_threshold=decide.calibrate_unknown_threshold(g_emb, g_src, config.unknown_accept)
                      ).configured(config)
    metrics, decisions = _scores(decider, q_emb, q_src, g_emb, g_src, queries.jpeg, queries.quality, g_keys, queries.dims)
    robustness = []
    for i, perturbation in enumerate(perturbations):
        progress("perturb", {"done": i, "total": len(perturbations), "perturbation": str(perturbation), "images": len(q_src)})
        p_emb = model.embed([perturbation.apply(x, space) for x in queries.pixels])
        jpeg = [perturbation.makes_jpeg or j for j in queries.jpeg]
        quality = [int(perturbation.value)] * len(jpeg) if perturbation.makes_jpeg else queries.quality
        p_metrics, p_decisions = _scores(decider, p_emb, q_src, g_emb, g_src, jpeg, quality, g_keys, queries.dims)  # sizes kept
        robustness.append({"perturbation": str(perturbation), **p_metrics, "decisions": _decision_rows(queries.uris, q_src, p_decisions)})
    predicted = [d["predicted_source"] for d in decisions]
    names, matrix = confusion_matrix(q_src, predicted, sorted(set(q_src) | set(predicted) | {decide.UNKNOWN}))
    return {
        "directory": directory,
        "layout": layout,
        "shots": shots,
        "real_shots": shots if real_shots is None else real_shots,
        "seed": seed,
        "model_version": current.version,
        "input": model.input_kind,
        "fingerprint": str(model.model.fingerprint),
        "adapted": adapt_info,
        "gallery_images": len(g_src),
        "query_images": len(q_src),
        "errors": gallery.errors + queries.errors,
        **metrics,
        "detection": decider.rule,
        "real_threshold": decider.real_threshold,
        "jpeg_threshold": decider.jpeg_threshold,
        "jpeg_thresholds": decider.jpeg_thresholds,
        "size_thresholds": decider.size_thresholds,  # images smaller than the view: by side (`Decider.threshold`)
        "jpeg_size_thresholds": decider.jpeg_size_thresholds,
        "unknown_threshold": decider.unknown_threshold,
        "perturbations": robustness,
        "per_source": per_source_table(q_src, predicted),
        "decisions": _decision_rows(queries.uris, q_src, decisions),
        "confusion": {"labels": names, "matrix": matrix.tolist()},
    }


def evaluation_markdown(result: dict) -> str:
    lines = [
        f"# lida eval: {result['shots']}-shot"
        + (f" ({result['real_shots']} real)" if result.get("real_shots", result["shots"]) != result["shots"] else "")
        + f", model {result['model_version']} ({result['input']}, {result['fingerprint']})",
        "",
        f"- gallery {result['gallery_images']} images, queries {result['query_images']}, errors {len(result['errors'])}",
        f"- attribution accuracy **{result['attribution_accuracy']:.3f}** (the decisions the attributions table would hold: "
        f"real, a source or unknown), Rank-1 **{result['rank1']:.3f}**, mAP {result['mAP']:.3f}",
        f"- real vs generated: balanced accuracy **{result['balanced_accuracy']:.3f}**, AUROC {result['auroc']:.3f}, "
        f"real images called generated {result.get('false_positive_rate', float('nan')):.3f} "
        f"({result.get('detection', 'prototype')} rule, threshold {result['real_threshold']:.3f})",
        "",
        "| source | queries | correct | recall | precision |",
        "|---|---|---|---|---|",
    ]
    for row in result["per_source"]:
        lines.append(f"| {row['source']} | {row['count']} | {row['correct']} | {row['recall']:.3f} | {row['precision']:.3f} |")
    if result.get("perturbations"):
        lines += ["", "Robustness: the same queries perturbed (gallery and fit clean)", "",
                  "| queries | Rank-1 | mAP | attribution | balanced | AUROC | real called generated |", "|---|---|---|---|---|---|---|"]
        for row in [{"perturbation": "clean", **result}, *result["perturbations"]]:
            lines.append(f"| {row['perturbation']} | {row['rank1']:.3f} | {row['mAP']:.3f} | {row['attribution_accuracy']:.3f} | "
                         f"{row['balanced_accuracy']:.3f} | {row['auroc']:.3f} | {row['false_positive_rate']:.3f} |")
    labels = result["confusion"]["labels"]
    lines += ["", "Confusion (rows: true, columns: predicted)", "", "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in zip(labels, result["confusion"]["matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def save_evaluation(ws: Workspace, result: dict) -> dict:
    rel = f"{EVALS}/{utc_stamp()}-{result['shots']}shot"
    ws.write_json(f"{rel}.json", result)
    ws.write_bytes(f"{rel}.md", evaluation_markdown(result).encode())
    return {"json": ws.uri(f"{rel}.json"), "markdown": ws.uri(f"{rel}.md")}

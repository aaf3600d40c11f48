"""Evaluation metrics: retrieval (Rank-1, mAP), detection (balanced accuracy, AUROC), tables.

Retrieval follows the authors' `evaluate_metrics`: every query ranks the whole gallery by
similarity (higher first, ties in gallery order); Rank-1 is the share of queries whose
first neighbour has the query's label; AP is the mean of precision@k over the ranks k of
the query's relevant gallery items; mAP is its mean over queries. Queries whose label has
no gallery item are left out of both (and counted in `skipped_queries`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def retrieval_metrics(similarity: np.ndarray, query_labels: Sequence, gallery_labels: Sequence) -> dict:
    """Rank-1 and mAP from a Q x G similarity matrix, vectorised over queries."""
    sim = np.asarray(similarity, dtype=np.float64)
    q = np.asarray(query_labels)
    g = np.asarray(gallery_labels)
    if sim.shape != (q.size, g.size):
        raise ValueError(f"similarity is {sim.shape}, expected {(q.size, g.size)}")
    if q.size == 0 or g.size == 0:
        return {"rank1": float("nan"), "mAP": float("nan"), "queries": 0, "skipped_queries": int(q.size), "ap": np.array([])}
    order = np.argsort(-sim, axis=1, kind="stable")
    matches = g[order] == q[:, None]
    relevant = matches.sum(1)
    valid = relevant > 0
    hits = np.cumsum(matches, axis=1)
    ranks = np.arange(1, g.size + 1)[None, :]
    ap = np.where(valid, (matches * hits / ranks).sum(1) / np.maximum(relevant, 1), np.nan)
    rank1 = matches[:, 0][valid]
    return {
        "rank1": float(rank1.mean()) if valid.any() else float("nan"),
        "mAP": float(np.nanmean(ap)) if valid.any() else float("nan"),
        "queries": int(valid.sum()),
        "skipped_queries": int((~valid).sum()),
        "ap": ap,
    }


def balanced_accuracy(is_generated: Sequence[bool], predicted_generated: Sequence[bool]) -> float:
    """Mean of the accuracy on real images and the accuracy on generated images."""
    truth = np.asarray(is_generated, dtype=bool)
    pred = np.asarray(predicted_generated, dtype=bool)
    parts = []
    if (~truth).any():
        parts.append(float((~pred[~truth]).mean()))
    if truth.any():
        parts.append(float(pred[truth].mean()))
    return float(np.mean(parts)) if parts else float("nan")


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted as half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Average ranks within runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion_matrix(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Rows: true label; columns: predicted label. Labels default to all seen, sorted."""
    t = [str(x) for x in truth]
    p = [str(x) for x in predicted]
    if len(t) != len(p):
        raise ValueError("truth and predicted differ in length")
    names = list(labels) if labels is not None else sorted(set(t) | set(p))
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    for a, b in zip(t, p, strict=True):
        if a not in index or b not in index:
            raise ValueError(f"label {a if a not in index else b!r} is not among the matrix labels")
        matrix[index[a], index[b]] += 1
    return names, matrix


def per_source_table(truth: Sequence[str], predicted: Sequence[str]) -> list[dict]:
    """One row per true source: count, correct, recall (accuracy on it) and precision."""
    names, matrix = confusion_matrix(truth, predicted)
    rows = []
    for i, name in enumerate(names):
        n = int(matrix[i].sum())
        if n == 0:
            continue
        predicted_as = int(matrix[:, i].sum())
        rows.append(
            {
                "source": name,
                "count": n,
                "correct": int(matrix[i, i]),
                "recall": matrix[i, i] / n,
                "precision": (matrix[i, i] / predicted_as) if predicted_as else float("nan"),
            }
        )
    return rows

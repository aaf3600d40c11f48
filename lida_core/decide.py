"""Decisions from embeddings: real or generated, which source, or `unknown`; and their calibration.

- Real vs generated: similarity to the real prototype (the paper), that similarity minus the
  one to the nearest generator prototype ("contrast"), or the closed-form profiles' quadratic
  rule (`statistical.QuadraticDetector`). Each threshold is calibrated on held-out real
  images to a target false-positive rate (a conformal quantile), one for PNG-like inputs and
  one for JPEG ones; the closed-form profiles also calibrate one per JPEG quality on a grid,
  and a JPEG is judged by the one nearest its own quality (`decode.jpeg_quality`). A
  workspace may fix the threshold instead (`lida config real_threshold`).
- Which source: a similarity-weighted vote of the k nearest gallery images, or the nearest
  source centroid.
- `unknown`: a generated image whose best match in its voted source is less similar than
  `accept` of the gallery's own images are to their nearest same-source neighbour.
- Unknown clusters: `unknown` images that resemble each other (connected components above
  that threshold), candidates for a generator nobody registered yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

REAL = "real"
UNKNOWN = "unknown"


def image_key(source: str, image_id: str) -> str:
    """One gallery image under one source (an image may be registered under two): how fits and views name it."""
    return f"{source}:{image_id}"


def real_prototype(real_embeddings: np.ndarray) -> np.ndarray:
    """Mean of normalised real features, itself normalised."""
    if len(real_embeddings) == 0:
        raise ValueError("the real prototype needs at least one real image")
    mean = real_embeddings.mean(0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


def calibrate_real_threshold(real_scores: np.ndarray, target_fpr: float = 0.05) -> float:
    """Score below which an image is called generated: at most `target_fpr` of new real images fall below.

    The conformal (split) quantile: with n held-out real scores, the k-th smallest for
    k = floor(target_fpr * (n + 1)). A new real image is exchangeable with them, so it falls
    below that threshold with probability k / (n + 1) <= target_fpr. The plain empirical
    quantile (the (floor(target_fpr * n) + 1)-th smallest) lets (floor(target_fpr * n) + 1) / (n + 1)
    through: 7.4% instead of 5% with 26 calibration images. With fewer than 1 / target_fpr - 1
    images the smallest score is the threshold (1 / (n + 1): nothing better can be promised).
    """
    scores = np.sort(np.asarray(real_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("calibration needs held-out real images")
    k = int(math.floor(target_fpr * (scores.size + 1)))
    return float(scores[max(k, 1) - 1])


def leave_one_out_similarities(embeddings: np.ndarray, labels: Sequence[str], rows: np.ndarray | None = None,
                               block: int = 1024) -> np.ndarray:
    """Each image's (or each of `rows`') best similarity to another image of its own label (NaN when it is alone).

    Computed `block` rows at a time, so memory grows with the gallery, not with its square.
    """
    labels = np.asarray(labels)
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    best = np.full(len(rows), -np.inf)
    for start in range(0, len(rows), block):
        chunk = rows[start : start + block]
        sim = embeddings[chunk] @ embeddings.T
        sim[np.arange(len(chunk)), chunk] = -np.inf
        best[start : start + block] = np.where(labels[chunk][:, None] == labels[None, :], sim, -np.inf).max(1, initial=-np.inf)
    return np.where(np.isfinite(best), best, np.nan)


UNKNOWN_CALIBRATION_QUERIES = 5000  # gallery images whose nearest same-source neighbour calibrates `unknown`


def calibrate_unknown_threshold(embeddings: np.ndarray, labels: Sequence[str], accept: float = 0.95) -> float | None:
    """Similarity below which a generated image is `unknown`: keeps `accept` of known ones.

    Calibrated leave-one-out on generator gallery images (a seeded sample of at most
    UNKNOWN_CALIBRATION_QUERIES of them, each against the whole gallery); None when no source
    has two images.
    """
    labels = np.asarray(labels)
    mask = labels != REAL
    rows = None
    if mask.sum() > UNKNOWN_CALIBRATION_QUERIES:
        rows = np.sort(np.random.default_rng(0).choice(int(mask.sum()), UNKNOWN_CALIBRATION_QUERIES, replace=False))
    best = leave_one_out_similarities(embeddings[mask], labels[mask], rows)
    best = best[np.isfinite(best)]
    if best.size == 0:
        return None
    return float(np.quantile(best, 1.0 - accept))


def generator_prototypes(embeddings: np.ndarray, labels: Sequence[str]) -> dict[str, np.ndarray]:
    """{generator source: its normalised mean embedding} (real left out)."""
    labels = np.asarray(labels)
    return {str(s): real_prototype(embeddings[labels == s]) for s in sorted(set(labels.tolist()) - {REAL})}


def detection_scores(embeddings: np.ndarray, prototype: np.ndarray, generators: np.ndarray | None = None) -> np.ndarray:
    """How real each embedding looks: similarity to the real prototype, minus (contrast) that to the nearest generator's."""
    scores = np.asarray(embeddings, dtype=np.float32) @ prototype
    if generators is not None and len(generators):
        scores = scores - (np.asarray(embeddings, dtype=np.float32) @ np.asarray(generators, dtype=np.float32).T).max(1)
    return scores


@dataclass
class Decider:
    """The calibrated decisions applied to query embeddings.

    Detection compares `detection_scores` with `real_threshold`: the similarity to the real
    prototype (the paper), or with `generators` (one prototype per registered generator) that
    similarity minus the one to the nearest generator prototype ("contrast"). Either way the
    threshold is calibrated on held-out real images to the target false-positive rate.
    """

    prototype: np.ndarray
    real_threshold: float
    unknown_threshold: float | None
    method: str = "knn"  # knn | centroid
    k: int = 5
    top_k: int = 5
    generators: np.ndarray | None = None
    quadratic: dict | None = None  # QuadraticDetector.to_dict(): the "quadratic" rule, which replaces the two above
    # JPEG inputs score lower than PNG ones under the same rule (their low bits are the codec's), so
    # they get a threshold calibrated on JPEG images alone: each format keeps the target rate.
    jpeg_threshold: float | None = None
    # ...and how low depends on the quality: {quality: threshold calibrated on copies at that quality}.
    # A JPEG whose quality is known takes the nearest one's (ties to the higher quality); one calibrated
    # on copies spread over every quality held real JPEG 90s of unseen collections at 10% (docs/results.md).
    jpeg_thresholds: dict[int, float] | None = None
    # A gallery registered (partly) as PNGs meets JPEG queries through its JPEG view (`statistical.jpeg_view`): the
    # quadratic rule fitted with the generated side as JPEG copies scores those queries and names their source
    # (the nearest generator mean), and one farther from its nearest mean than `jpeg_unknown_distance` is `unknown`.
    # Against the PNG gallery itself a JPEG of a registered generator looked unlike all of it: on the devset 80% of the
    # detected JPEG 90 queries came out `unknown` (docs/results.md, session 24). None: JPEGs are judged like the rest.
    quadratic_jpeg: dict | None = None
    jpeg_unknown_distance: float | None = None
    # ...and retrieval: {"keys": [`image_key`], "sources": [...], "embeddings": [[...]], "images": [...]}, the generator
    # images of the fit (keys, sources) as a JPEG query meets them: the rows of the JPEG view, each with its image (an
    # index into keys). A JPEG query meets such an image through its most similar row instead of its own embedding, so
    # its neighbours, top-k and Rank-1 are the view's too: a PNG's own embedding is unlike its JPEG copies' (Rank-1 of
    # JPEG 90 queries against a PNG gallery 0.491 -> 0.572; docs/results.md, session 26). Images registered after the
    # fit are not in it and are met as they are. None: every query meets the gallery as it is.
    jpeg_gallery: dict | None = None
    # An image smaller than the model's view (`view_size` on a side) counts fewer pixels, and its scores move with its
    # size: {side: threshold calibrated on crops of the pre-training photographs of that side} (`statistical.size_copies`),
    # for PNG-like inputs and for JPEGs. Its threshold is interpolated over log side between these and the full-size one
    # (`threshold`), and never looser than the full-size one. None: every image takes the full-size threshold.
    size_thresholds: dict[int, float] | None = None
    jpeg_size_thresholds: dict[int, float] | None = None
    view_size: int | None = None

    def configured(self, config) -> Decider:
        """This decider under a workspace's decision settings: vote, k, top-k, and a fixed threshold if one is set."""
        out = replace(self, method=config.decision, k=config.k, top_k=config.top_k)
        if config.real_threshold is not None:  # the paper's way: one hand-set threshold, for every format
            out = replace(out, real_threshold=float(config.real_threshold), jpeg_threshold=None, jpeg_thresholds=None,
                          size_thresholds=None, jpeg_size_thresholds=None)
        return out

    def threshold(self, jpeg: bool = False, quality: int | None = None, dims: tuple[int, int] | None = None) -> float:
        """The real threshold for an input: PNG-like, or a JPEG (of this quality, when known), of `dims` (height, width)
        when known.

        An input smaller than the view on a side is described from min(height, view) x min(width, view) pixels: its
        side is that area's square root. Its threshold is the full-size one's and the size thresholds' interpolation
        over log side (held at the smallest calibrated side below it), or the full-size one if that is stricter:
        on the devset, crops of photographs unlike the pre-training ones scored lower than the pre-training crops
        when the gallery was full-size, so a looser threshold flagged more of them (docs/results.md, session 29).
        """
        shift = 0.0  # a JPEG's size thresholds come from copies at mixed qualities: moved as its quality moves the full-size one
        if not jpeg:
            full = self.real_threshold
        elif quality is not None and self.jpeg_thresholds:
            full = self.jpeg_thresholds[min(self.jpeg_thresholds, key=lambda q: (abs(q - quality), -q))]
            shift = full - self.jpeg_threshold if self.jpeg_threshold is not None else 0.0
        else:
            full = self.jpeg_threshold if self.jpeg_threshold is not None else self.real_threshold
        anchors = self.jpeg_size_thresholds if jpeg else self.size_thresholds
        side = view_side(dims, self.view_size)
        if not anchors or side is None:
            return full
        sides = sorted(s for s in anchors if s < self.view_size)
        if not sides:
            return full
        scaled = np.interp(np.log(side), np.log([*sides, self.view_size]), [anchors[s] + shift for s in sides] + [full])
        return float(min(full, scaled))

    @property
    def rule(self) -> str:
        return "quadratic" if self.quadratic is not None else "contrast" if self.generators is not None else "prototype"

    def scores(self, embeddings: np.ndarray, jpeg: Sequence[bool] | None = None) -> np.ndarray:
        """How real each embedding looks under this decider's rule (compared with `threshold`); `jpeg`: which
        are JPEG inputs (scored by the JPEG view's rule when the decider has one)."""
        if self.quadratic is None:
            return detection_scores(embeddings, self.prototype, self.generators)
        if self.quadratic_jpeg is None or jpeg is None or not any(jpeg):
            return self._quadratic_detector.scores(embeddings)
        embeddings, by_view = np.asarray(embeddings), np.asarray(jpeg, dtype=bool)
        scores = np.empty(len(embeddings))
        for rows, detector in ((~by_view, self._quadratic_detector), (by_view, self._jpeg_detector)):
            if rows.any():
                scores[rows] = detector.scores(embeddings[rows])
        return scores

    @cached_property
    def _quadratic_detector(self):
        from lida_core.statistical import QuadraticDetector

        return QuadraticDetector.from_dict(self.quadratic)

    @cached_property
    def _jpeg_detector(self):
        from lida_core.statistical import QuadraticDetector

        return QuadraticDetector.from_dict(self.quadratic_jpeg)

    @cached_property
    def _jpeg_view(self) -> tuple[dict[str, int], list[str], np.ndarray, np.ndarray] | None:
        """(index of each image's key, each image's source, the view's rows grouped by image, where each image's
        rows start) of `jpeg_gallery`, or None."""
        if not self.jpeg_gallery:
            return None
        keys, sources = list(self.jpeg_gallery["keys"]), [str(s) for s in self.jpeg_gallery["sources"]]
        embeddings = np.asarray(self.jpeg_gallery["embeddings"], dtype=np.float32)
        owners = np.asarray(self.jpeg_gallery["images"], dtype=np.int64)
        if len(sources) != len(keys) or embeddings.ndim != 2 or len(owners) != len(embeddings) \
                or (len(owners) and not 0 <= owners.min() <= owners.max() < len(keys)):
            raise ValueError(f"a JPEG gallery view of {len(keys)} images with {len(sources)} sources and "
                             f"{len(owners)} owners of {len(embeddings)} rows")
        if len(np.unique(owners)) != len(keys):
            raise ValueError(f"a JPEG gallery view names {len(keys)} images but has rows for {len(np.unique(owners))}")
        order = np.argsort(owners, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(owners[order]) != 0])
        return {k: i for i, k in enumerate(keys)}, sources, embeddings[order], starts

    def _view_similarities(self, queries: np.ndarray) -> np.ndarray:
        """Q x (the view's images): each query's best similarity to each image's view rows."""
        _, _, embeddings, starts = self._jpeg_view
        per_row = np.asarray(queries, dtype=np.float32).reshape(-1, embeddings.shape[1]) @ embeddings.T
        return np.maximum.reduceat(per_row, starts, axis=1) if per_row.size else per_row[:, :len(starts)]

    def similarities(self, queries: np.ndarray, gallery: np.ndarray, jpeg: Sequence[bool] | None = None,
                     keys: Sequence[str] | None = None) -> np.ndarray:
        """Q x G similarities of queries to the gallery (rows named by `keys`); the JPEG ones (`jpeg`) meet each image
        of the JPEG view through its best view row, everything else as it is."""
        queries = np.asarray(queries, dtype=np.float32)
        sims = queries @ np.asarray(gallery, dtype=np.float32).T
        rows = np.zeros(len(sims), bool) if jpeg is None else np.asarray(jpeg, dtype=bool)
        if self._jpeg_view is None or keys is None or not rows.any():
            return sims
        index = self._jpeg_view[0]
        columns = [i for i, key in enumerate(keys) if key in index]
        if columns:
            sims[np.ix_(rows, columns)] = self._view_similarities(queries[rows])[:, [index[keys[i]] for i in columns]]
        return sims

    def jpeg_similarities(self, queries: np.ndarray, gallery: np.ndarray, keys: Sequence[str] | None) -> np.ndarray:
        """`similarities` of queries that are all JPEGs."""
        return self.similarities(queries, gallery, [True] * len(queries), keys)

    def _jpeg_neighbours(self, view_sims: np.ndarray, sims: Sequence[float], labels: Sequence[str],
                         keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """A JPEG query's neighbours (most similar first) with the view's images met through their view rows
        (`view_sims`, the query's `_view_similarities`)."""
        index, sources = self._jpeg_view[:2]
        keep = [i for i, key in enumerate(keys) if key not in index]
        wanted = max(len(keys), self.k, self.top_k)  # no more of the view than the search's own depth can reach the decision
        best = np.argpartition(-view_sims, wanted - 1)[:wanted] if wanted < len(view_sims) else np.arange(len(view_sims))
        merged = np.concatenate([np.asarray(sims, dtype=np.float64)[keep], view_sims[best]])
        names = [labels[i] for i in keep] + [sources[i] for i in best]
        order = np.argsort(-merged, kind="stable")
        return merged[order], [names[i] for i in order]

    def decide(self, queries: np.ndarray, gallery: np.ndarray, gallery_labels: Sequence[str],
               jpeg: Sequence[bool] | None = None, quality: Sequence[int | None] | None = None,
               gallery_keys: Sequence[str] | None = None, similarities: np.ndarray | None = None,
               dims: Sequence[tuple[int, int] | None] | None = None) -> list[dict]:
        """Decisions against a whole gallery (exact search); `jpeg` says which queries were JPEG files, `quality` their
        qualities; `gallery_keys` name the gallery's rows (`image_key`), so JPEG queries meet the JPEG view's images
        through it (`jpeg_gallery`). `similarities`: what `similarities` gives for these arguments, when the caller
        has it already. `dims`: each query's (height, width), for the threshold of small images (`threshold`)."""
        labels = np.asarray(gallery_labels)
        jpeg = [bool(jpeg and jpeg[i]) for i in range(len(queries))]
        if similarities is not None:
            sims = np.asarray(similarities)
            if sims.shape != (len(queries), len(gallery)):
                raise ValueError(f"similarities are {sims.shape} for {len(queries)} queries and {len(gallery)} gallery images")
        elif len(gallery):
            sims = self.similarities(queries, gallery, jpeg, gallery_keys)
        else:
            sims = np.zeros((len(queries), 0), np.float32)
        orders = [np.argsort(-row, kind="stable") for row in sims]
        return self.decide_neighbours(queries, [(row[order], labels[order].tolist()) for row, order in zip(sims, orders, strict=True)],
                                      jpeg, quality, dims=dims)

    def decide_neighbours(self, queries: np.ndarray, neighbours: Sequence[tuple[Sequence[float], Sequence[str]]],
                          jpeg: Sequence[bool], quality: Sequence[int | None] | None = None,
                          keys: Sequence[Sequence[str]] | None = None,
                          dims: Sequence[tuple[int, int] | None] | None = None) -> list[dict]:
        """Each query's decision from its (similarities, labels), most similar first; detection scored for all at once.

        One matrix product for the batch instead of one per query: a tenth of a scan's attribution stage.
        `quality`: each JPEG query's quality (`decode.jpeg_quality`), None where unknown. `keys`: each
        query's neighbours' `image_key`s (an index search's), so a JPEG query meets the JPEG view's
        images through it (`jpeg_gallery`) instead of as they were found. `dims`: each query's (height, width), None
        where unknown.
        """
        real_scores = self.scores(queries, jpeg) if len(queries) else []
        quality = [None] * len(queries) if quality is None else quality
        dims = [None] * len(queries) if dims is None else dims
        if keys is not None and self._jpeg_view is not None and any(jpeg):
            rows = np.flatnonzero(np.asarray(jpeg, dtype=bool))
            view_sims = dict(zip(rows.tolist(), self._view_similarities(np.asarray(queries)[rows]), strict=True))  # one product
            neighbours = [self._jpeg_neighbours(view_sims[i], *found, named) if i in view_sims else found
                          for i, (found, named) in enumerate(zip(neighbours, keys, strict=True))]
        return [self.decide_from_similarities(query, sims, labels, bool(is_jpeg), real_score=float(score), quality=q, dims=d)
                for query, (sims, labels), is_jpeg, score, q, d in zip(queries, neighbours, jpeg, real_scores, quality, dims, strict=True)]

    def decide_from_similarities(self, query: np.ndarray, similarities: Sequence[float], labels: Sequence[str],
                                 jpeg: bool = False, real_score: float | None = None, quality: int | None = None,
                                 dims: tuple[int, int] | None = None) -> dict:
        """One decision from the query's neighbours, most similar first (as an index returns them).

        `real_score`: the query's `scores`, when the caller scored a batch (`decide_neighbours`).
        """
        sims = np.asarray(similarities, dtype=np.float64)
        labels = list(labels)
        if real_score is None:
            real_score = float(self.scores(np.asarray(query)[None], [jpeg])[0])
        generated = bool(real_score < self.threshold(jpeg, quality, dims))
        scores = self._source_scores(sims, labels)
        candidates = {s: v for s, v in scores.items() if s != REAL}
        voted = max(candidates, key=lambda s: (candidates[s], s)) if candidates else None
        if not generated:
            predicted = REAL
        elif jpeg and self.quadratic_jpeg is not None and (voted is None or voted in (self._jpeg_detector.sources or ())):
            # the JPEG view names the source; the neighbours' vote stands only for a source registered after the fit
            # (the view's real images can fill a JPEG query's nearest neighbours: the view still names the source)
            predicted = self._jpeg_source(query)
        elif voted is None:
            predicted = UNKNOWN
        else:
            best = max(sim for sim, label in zip(sims, labels, strict=True) if label == voted)
            predicted = UNKNOWN if self.unknown_threshold is not None and best < self.unknown_threshold else voted
        top = min(self.top_k, len(labels))
        return {
            "predicted_source": predicted,
            "is_generated": generated,
            "real_score": real_score,
            "top1_similarity": float(sims[0]) if len(sims) else float("nan"),
            "topk_sources": [str(label) for label in labels[:top]],
            "topk_similarities": [float(v) for v in sims[:top]],
        }

    def _jpeg_source(self, query: np.ndarray) -> str:
        """A JPEG query's source under the JPEG view: its nearest generator mean, or `unknown` past `jpeg_unknown_distance`."""
        detector = self._jpeg_detector
        distances = detector.generator_distances(np.asarray(query)[None])[0]
        nearest = int(np.argmin(distances))
        if self.jpeg_unknown_distance is not None and distances[nearest] > self.jpeg_unknown_distance:
            return UNKNOWN
        return detector.sources[nearest]

    def _source_scores(self, sims: np.ndarray, labels: list[str]) -> dict[str, float]:
        sources = sorted(set(labels))
        if self.method == "centroid":
            return {s: float(np.mean([v for v, label in zip(sims, labels, strict=True) if label == s])) for s in sources}
        # k-NN: similarity-weighted votes of the k nearest; ties broken by the best similarity.
        votes: dict[str, float] = {}
        for v, label in zip(sims[: self.k], labels[: self.k], strict=True):
            votes[label] = votes.get(label, 0.0) + float(v) + 1.0
        best = {}
        for v, label in zip(sims, labels, strict=True):
            best.setdefault(label, float(v))
        return {s: votes.get(s, 0.0) + 1e-3 * best[s] for s in sources}

    def to_dict(self) -> dict:
        return {
            "prototype": self.prototype.tolist(),
            "real_threshold": self.real_threshold,
            "unknown_threshold": self.unknown_threshold,
            "method": self.method,
            "k": self.k,
            "top_k": self.top_k,
            "generators": None if self.generators is None else np.asarray(self.generators).tolist(),
            "quadratic": self.quadratic,
            "jpeg_threshold": self.jpeg_threshold,
            "jpeg_thresholds": _keyed(self.jpeg_thresholds),
            "quadratic_jpeg": self.quadratic_jpeg,
            "jpeg_unknown_distance": self.jpeg_unknown_distance,
            "jpeg_gallery": self.jpeg_gallery,
            "size_thresholds": _keyed(self.size_thresholds),
            "jpeg_size_thresholds": _keyed(self.jpeg_size_thresholds),
            "view_size": self.view_size,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Decider:
        return cls(
            prototype=np.asarray(data["prototype"], dtype=np.float32),
            real_threshold=float(data["real_threshold"]),
            unknown_threshold=None if data.get("unknown_threshold") is None else float(data["unknown_threshold"]),
            method=data.get("method", "knn"),
            k=int(data.get("k", 5)),
            top_k=int(data.get("top_k", 5)),
            generators=None if data.get("generators") is None else np.asarray(data["generators"], dtype=np.float32),
            quadratic=data.get("quadratic"),
            jpeg_threshold=None if data.get("jpeg_threshold") is None else float(data["jpeg_threshold"]),
            jpeg_thresholds=_unkeyed(data.get("jpeg_thresholds")),
            quadratic_jpeg=data.get("quadratic_jpeg"),
            jpeg_unknown_distance=None if data.get("jpeg_unknown_distance") is None else float(data["jpeg_unknown_distance"]),
            jpeg_gallery=data.get("jpeg_gallery") or None,
            size_thresholds=_unkeyed(data.get("size_thresholds")),
            jpeg_size_thresholds=_unkeyed(data.get("jpeg_size_thresholds")),
            view_size=None if data.get("view_size") is None else int(data["view_size"]),
        )


def _keyed(thresholds: dict[int, float] | None) -> dict[str, float] | None:
    """{int: threshold} as JSON keeps it (string keys, in order)."""
    return None if thresholds is None else {str(k): float(t) for k, t in sorted(thresholds.items())}


def _unkeyed(data: dict | None) -> dict[int, float] | None:
    """`_keyed`'s inverse; an empty one is None."""
    return None if not data else {int(k): float(t) for k, t in data.items()}


def view_side(dims: tuple[int, int] | None, view: int | None) -> float | None:
    """The side of the square with as many pixels as an image of `dims` (height, width) gives a crop fit's view of
    side `view`: None when it fills the view (or either is unknown)."""
    if dims is None or view is None or dims[0] is None or dims[1] is None:
        return None
    height, width = int(dims[0]), int(dims[1])
    if height >= view and width >= view:
        return None
    return float(np.sqrt(max(1, min(height, view)) * max(1, min(width, view))))


def unknown_clusters(embeddings: np.ndarray, threshold: float, min_size: int = 2, block: int = 1024) -> list[list[int]]:
    """Groups (row indexes, largest first) of normalised embeddings linked by similarity >= threshold.

    The graph is built `block` rows at a time, so memory grows with the links, not with n squared.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(embeddings)
    rows, cols = [], []
    for start in range(0, n, block):
        a, b = np.nonzero(embeddings[start : start + block] @ embeddings.T >= threshold)
        rows.append(a + start)
        cols.append(b)
    rows, cols = np.concatenate(rows) if rows else np.zeros(0, int), np.concatenate(cols) if cols else np.zeros(0, int)
    _, component = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(component.tolist()):
        groups.setdefault(c, []).append(i)
    return sorted((m for m in groups.values() if len(m) >= min_size), key=lambda m: (-len(m), m[0]))

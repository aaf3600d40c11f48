"""`lida report`: one self-contained HTML file per scan (inline SVG plots, no scripts or files fetched).

Sections: images by status and by predicted source; top-1 similarity and real-score histograms
with the thresholds the decisions used; a 2-D projection (PCA) of the scan's embeddings and the
gallery's, coloured by source; errors; and the confusion matrix of the latest `lida eval`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

import numpy as np

from lida_core.workspace import EVALS, SHARDS, Workspace, WorkspaceError, scan_ids, table_folder, utc_now

# real is green and unknown grey; generators take the other colours (no greens or greys among them)
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#b07aa1", "#edc948", "#9c755f", "#17becf", "#ff9da7", "#1f3a93",
           "#8c564b", "#d62728", "#e377c2"]
REAL_COLOUR, UNKNOWN_COLOUR = "#2ca02c", "#7f7f7f"
MAX_POINTS = 3000


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def colours(sources: Sequence[str]) -> dict[str, str]:
    out, i = {}, 0
    for s in sorted(set(sources)):
        if s == "real":
            out[s] = REAL_COLOUR
        elif s == "unknown":
            out[s] = UNKNOWN_COLOUR
        else:
            out[s] = PALETTE[i % len(PALETTE)]
            i += 1
    return out


# ---------------------------------------------------------------- SVG pieces


def bar_chart(title: str, counts: dict[str, int], palette: dict[str, str] | None = None) -> str:
    width, row, left = 560, 22, 170
    items = list(counts.items()) or [("(none)", 0)]
    height = 30 + row * len(items)
    top = max([v for _, v in items] + [1])
    parts = [f'<svg class="plot" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f"<title>{_esc(title)}</title>"]
    for i, (name, value) in enumerate(items):
        y = 20 + i * row
        w = (width - left - 60) * value / top
        fill = (palette or {}).get(name, PALETTE[0])
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{_esc(name)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 6}" fill="{fill}"/>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 14}">{value}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(title: str, values: Sequence[float], thresholds: dict[str, float | None], lo: float | None = None,
              hi: float | None = None, bins: int = 40, groups: dict[str, Sequence[float]] | None = None,
              palette: dict[str, str] | None = None) -> str:
    """Stacked histogram of `groups` (or one series of `values`) on [lo, hi], with labelled threshold lines.

    Without `lo`/`hi` the axis spans the values and thresholds (plus a margin): similarities
    bunch within a few thousandths, and the quadratic rule's real scores are not in [-1, 1].
    """
    width, height, pad = 560, 220, 36
    groups = groups if groups is not None else {"all": values}
    if lo is None or hi is None:
        seen = np.asarray([float(v) for vs in groups.values() for v in vs] + [float(t) for t in thresholds.values() if t is not None])
        seen = seen[np.isfinite(seen)]
        low, high = (float(seen.min()), float(seen.max())) if seen.size else (-1.0, 1.0)
        margin = max(high - low, 1e-6) * 0.05
        lo = low - margin if lo is None else lo
        hi = high + margin if hi is None else hi
    edges = np.linspace(lo, hi, bins + 1)
    counts = {g: np.histogram(np.clip(np.asarray(v, float), lo, hi), edges)[0] for g, v in groups.items()}
    total = sum(counts.values()) if counts else np.zeros(bins)
    top = max(int(np.max(total)) if len(groups) else 0, 1)
    x = lambda v: pad + (width - 2 * pad) * (v - lo) / (hi - lo)  # noqa: E731
    y = lambda c: height - pad - (height - 2 * pad) * c / top  # noqa: E731
    parts = [f'<svg class="plot" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f"<title>{_esc(title)}</title>",
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>']
    base = np.zeros(bins)
    for g, c in counts.items():
        fill = (palette or {}).get(g, PALETTE[0])
        for b in range(bins):
            if c[b]:
                parts.append(f'<rect x="{x(edges[b]):.1f}" y="{y(base[b] + c[b]):.1f}" width="{x(edges[b + 1]) - x(edges[b]) - 1:.1f}" '
                             f'height="{y(base[b]) - y(base[b] + c[b]):.1f}" fill="{fill}"><title>{_esc(g)}: {c[b]}</title></rect>')
        base = base + c
    for tick in np.linspace(lo, hi, 5):
        parts.append(f'<text x="{x(tick):.1f}" y="{height - pad + 16}" text-anchor="middle">{tick:.4g}</text>')
    parts.append(f'<text x="{pad - 4}" y="{pad}" text-anchor="end">{top}</text>')
    for k, (name, value) in enumerate(thresholds.items()):
        if value is None:
            continue
        parts.append(f'<line class="threshold" x1="{x(value):.1f}" y1="{pad - 10}" x2="{x(value):.1f}" y2="{height - pad}" '
                     f'stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/>')
        parts.append(f'<text x="{x(value) + 4:.1f}" y="{pad - 12 + 12 * k}" fill="#d62728">{_esc(name)} {value:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def scatter(title: str, points: np.ndarray, labels: Sequence[str], hollow: Sequence[bool], palette: dict[str, str]) -> str:
    width, height, pad = 560, 420, 20
    parts = [f'<svg class="plot" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f"<title>{_esc(title)}</title>", f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>']
    if len(points):
        lo, hi = points.min(axis=0), points.max(axis=0)
        span = np.where(hi - lo > 0, hi - lo, 1.0)
        scaled = (points - lo) / span
        for (px, py), label, open_ in zip(scaled, labels, hollow, strict=True):
            cx, cy = pad + px * (width - 2 * pad), height - pad - py * (height - 2 * pad)
            colour = palette.get(label, "#000")
            style = f'fill="none" stroke="{colour}"' if open_ else f'fill="{colour}" stroke="#222" stroke-width="0.6"'
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{3.2 if open_ else 4.5}" {style}><title>{_esc(label)}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def legend(palette: dict[str, str]) -> str:
    return '<p class="legend">' + " ".join(
        f'<span><i style="background:{c}"></i>{_esc(s)}</span>' for s, c in palette.items()) + "</p>"


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def confusion_table(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    top = max([max(r) for r in matrix if r] + [1])
    head = "".join(f"<th>{_esc(lbl)}</th>" for lbl in labels)
    rows = []
    for name, row in zip(labels, matrix, strict=True):
        cells = "".join(f'<td style="background:rgba(78,121,167,{0.08 + 0.85 * v / top:.2f})">{v}</td>' for v in row)
        rows.append(f"<tr><th>{_esc(name)}</th>{cells}</tr>")
    return f'<table class="confusion"><tr><th>true \\ predicted</th>{head}</tr>{"".join(rows)}</table>'


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    if len(vectors) < 2:
        return np.zeros((len(vectors), 2))
    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:2].T
    return out if out.shape[1] == 2 else np.hstack([out, np.zeros((len(out), 1))])


# ---------------------------------------------------------------- data


def latest_scan(ws: Workspace) -> str:
    finished = [s for s, done in scan_ids(ws).items() if done]
    if not finished:
        raise WorkspaceError(f"no finished scan in {ws.url} yet: run 'lida scan PATH...' first")
    return max(finished, key=lambda s: ws.read_json(SHARDS, s, "done.json").get("finished_at", ""))


def latest_evaluation(ws: Workspace) -> dict | None:
    folder = ws.path(EVALS)
    if not ws.fs.exists(folder):
        return None
    files = sorted(p for p in ws.fs.ls(folder, detail=False) if p.endswith(".json"))
    return json.loads(ws.fs.cat_file(files[-1])) if files else None


def thresholds(ws: Workspace, model_version: str) -> dict[str, float | None]:
    """The thresholds a scan with this model decides with, as `index.query_decider` sets them (a fixed one included)."""
    from lida_core.index import IndexMismatch, query_decider

    try:
        decider, _ = query_decider(ws, model_version, ws.model_meta(model_version), ws.config())
    except (IndexMismatch, WorkspaceError):  # no index of this model, or no calibrated rule yet: no lines drawn
        return {"real": None, "unknown": None}
    return {"real": decider.real_threshold, "unknown": decider.unknown_threshold}


def build_report(ws: Workspace, scan_id: str | None = None) -> tuple[str, dict]:
    ws.require()
    scan_id = scan_id or latest_scan(ws)
    if not ws.exists(SHARDS, scan_id, "done.json"):
        raise WorkspaceError(f"scan {scan_id!r} is not finished (or does not exist) in {ws.url}")
    images = ws.read_parquet(table_folder("images", scan_id), columns=["uri", "status", "error"])
    attributions = ws.read_parquet(table_folder("attributions", scan_id))
    if images is None or attributions is None:
        raise WorkspaceError(f"scan {scan_id!r} has no tables in {ws.url}")
    status = {}
    for s in images["status"].to_pylist():
        status[s] = status.get(s, 0) + 1
    predicted_list = attributions["predicted_source"].to_pylist()
    predicted = {s: predicted_list.count(s) for s in sorted(set(predicted_list))}
    versions = sorted(set(attributions["model_version"].to_pylist()))
    index_versions = sorted(set(attributions["index_version"].to_pylist()))
    fingerprints = sorted(set(attributions["fingerprint"].to_pylist())) if "fingerprint" in attributions.column_names else []
    model_version = versions[-1] if versions else ws.require_model_version()
    limits = thresholds(ws, model_version)

    gallery = ws.read_parquet(table_folder("gallery", model_version), columns=["image_id", "source", "embedding"])
    scan_emb = ws.read_parquet(table_folder("embeddings", model_version), columns=["image_id", "embedding"],
                               name_prefix=f"scan-{scan_id}-")
    sources = sorted(set(predicted) | set(gallery["source"].to_pylist() if gallery is not None else []))
    palette = colours(sources)

    by_pred: dict[str, list[float]] = {}
    for s, v in zip(predicted_list, attributions["top1_similarity"].to_pylist(), strict=True):
        by_pred.setdefault(s, []).append(v)
    by_pred_real: dict[str, list[float]] = {}
    for s, v in zip(predicted_list, attributions["real_score"].to_pylist(), strict=True):
        by_pred_real.setdefault(s, []).append(v)

    # 2-D projection: gallery (filled, true source) and scan images (hollow, predicted source)
    pred_of = dict(zip(attributions["image_id"].to_pylist(), predicted_list, strict=True))
    vecs, labels, hollow = [], [], []
    rng = np.random.default_rng(0)
    if gallery is not None and len(gallery):
        for v, s in zip(gallery["embedding"].to_pylist(), gallery["source"].to_pylist(), strict=True):
            vecs.append(v), labels.append(s), hollow.append(False)
    if scan_emb is not None and len(scan_emb):
        pick = np.arange(len(scan_emb))
        if len(pick) > MAX_POINTS:
            pick = np.sort(rng.choice(pick, MAX_POINTS, replace=False))
        ids, emb = scan_emb["image_id"].to_pylist(), scan_emb["embedding"]
        for i in pick:
            if ids[i] in pred_of:
                vecs.append(emb[int(i)].as_py()), labels.append(pred_of[ids[i]]), hollow.append(True)
    points = pca_2d(np.asarray(vecs, np.float64)) if vecs else np.zeros((0, 2))

    errors = [(u, e) for u, s, e in zip(images["uri"].to_pylist(), images["status"].to_pylist(),
                                         images["error"].to_pylist(), strict=True) if s == "error"]
    evaluation = latest_evaluation(ws)
    generated = sum(attributions["is_generated"].to_pylist())
    info = {"scan_id": scan_id, "files": len(images), "attributed": len(attributions), "generated": generated,
            "status": status, "predicted": predicted, "model_versions": versions, "index_versions": index_versions,
            "fingerprints": fingerprints, "thresholds": limits, "errors": len(errors),
            "evaluation": evaluation.get("model_version") if evaluation else None}

    sections = [
        f"<h1>lida scan report: {_esc(scan_id)}</h1>",
        f'<p class="meta">{len(images)} files, {len(attributions)} attributed, {generated} judged generated. '
        f"Model {_esc(', '.join(versions))}, index {_esc(', '.join(index_versions))}, fingerprint "
        f"{_esc(', '.join(fingerprints))}. Workspace {_esc(ws.url)}. Written {_esc(utc_now().isoformat(timespec='seconds'))}.</p>",
        "<h2>Images by status</h2>", bar_chart("images by status", status),
        "<h2>Images by predicted source</h2>", bar_chart("images by predicted source", predicted, palette),
        "<h2>Top-1 gallery similarity</h2>",
        "<p>Cosine similarity to the nearest gallery image; below the open-set threshold a generated image is "
        "<code>unknown</code>.</p>",
        histogram("top-1 similarity", [], {"unknown threshold": limits["unknown"]}, groups=by_pred, palette=palette),
        "<h2>Real score</h2>",
        "<p>Cosine similarity to the real prototype; below the calibrated threshold an image is judged generated.</p>",
        histogram("real score", [], {"real threshold": limits["real"]}, groups=by_pred_real, palette=palette),
        "<h2>Embeddings, 2-D projection (PCA)</h2>",
        "<p>Filled: gallery images by their registered source. Hollow: this scan's images by predicted source"
        + (f" (a sample of {MAX_POINTS})" if scan_emb is not None and len(scan_emb) > MAX_POINTS else "") + ".</p>",
        scatter("embedding projection", points, labels, hollow, palette), legend(palette),
        "<h2>Errors</h2>",
    ]
    if errors:
        rows = "".join(f"<tr><td><code>{_esc(u)}</code></td><td>{_esc(e)}</td></tr>" for u, e in errors[:500])
        more = f"<p>... and {len(errors) - 500} more (query the images table).</p>" if len(errors) > 500 else ""
        sections.append(f"<table><tr><th>file</th><th>reason</th></tr>{rows}</table>{more}")
    else:
        sections.append("<p>none</p>")
    sections.append("<h2>Latest evaluation</h2>")
    if evaluation:
        # evals/*.json is a workspace file, read as untrusted: every value is escaped or checked as a number
        sections.append(
            f"<p>{_esc(evaluation.get('shots'))}-shot on <code>{_esc(evaluation.get('directory'))}</code>, model "
            f"{_esc(evaluation.get('model_version'))}: Rank-1 <b>{_num(evaluation.get('rank1'))}</b>, "
            f"mAP <b>{_num(evaluation.get('mAP'))}</b>, "
            f"balanced real-vs-generated accuracy <b>{_num(evaluation.get('balanced_accuracy'))}</b>.</p>")
        confusion = evaluation.get("confusion") or {}
        try:
            matrix = [[int(v) for v in row] for row in confusion.get("matrix", [])]
            sections.append(confusion_table([str(x) for x in confusion.get("labels", [])], matrix))
        except (TypeError, ValueError):
            sections.append("<p>(its confusion matrix is not readable)</p>")
    else:
        sections.append("<p>no <code>lida eval</code> run in this workspace yet.</p>")
    page = TEMPLATE.replace("{title}", _esc(f"lida report {scan_id}")).replace("{body}", "\n".join(sections))
    return page, info


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:1.6em;border-bottom:1px solid #ddd}
svg.plot{display:block;font-size:11px;margin:.4em 0}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
.meta{color:#555}.legend span{margin-right:1em;white-space:nowrap}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:50%}
</style></head><body>
{body}
</body></html>
"""


def write_report(ws: Workspace, scan_id: str | None = None, output: str | None = None) -> dict:
    page, info = build_report(ws, scan_id)
    if output:
        import fsspec

        with fsspec.open(output, "wb") as handle:
            handle.write(page.encode())
        info["report"] = output
    else:
        rel = f"reports/{info['scan_id']}.html"
        ws.write_bytes(rel, page.encode())
        info["report"] = ws.uri(rel)
    info["bytes"] = len(page.encode())
    return info


__all__ = ["build_report", "write_report"]

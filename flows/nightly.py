"""The nightly scan flow: what is new in the inboxes -> one Beam scan -> a Markdown artifact.

New means a content hash not seen by any finished scan, so moved or re-uploaded files are not
redone. A nightly scan that was interrupted (no `done.json`) is resumed under its own id before
anything new is looked at, so nothing it had planned is lost.
"""

from __future__ import annotations

import time

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import RETRY_DELAY_S, content_hashes, offline_prefect, table_image_ids
from lida_core import decide
from lida_core.inputs import InputError, list_inputs
from lida_core.workspace import Workspace, WorkspaceError, table_folder, utc_stamp

PREFIX = "nightly-"


@task(name="find-new-files", retries=2, retry_delay_seconds=RETRY_DELAY_S)
def find_new_files(workspace: str) -> dict:
    """Inbox files whose content no finished scan has seen yet, one per distinct content."""
    from lida_core.workspace import scan_ids

    log = get_run_logger()
    ws = Workspace(workspace).require()
    config = ws.config()
    if not config.inboxes:
        raise WorkspaceError(f"workspace {ws.url} lists no inboxes: 'lida config inboxes PATH...' sets them")
    uris, missing = [], []
    for inbox in config.inboxes:
        try:
            uris += list_inputs([inbox], every_entry=True)  # every entry gets its row, as in 'lida scan'
        except (InputError, OSError) as exc:  # one inbox gone or unreachable does not stop the others
            missing.append(inbox)
            log.warning("inbox %s skipped: %s", inbox, exc)
    hashes = content_hashes(ws, uris, lambda n, total: log.info("hashed %d/%d inbox files", n, total))
    finished = [s for s, done in scan_ids(ws).items() if done]
    seen = table_image_ids(ws, "images", finished)
    new, contents = [], set()
    for uri in sorted(hashes):
        if hashes[uri] not in seen and hashes[uri] not in contents:
            contents.add(hashes[uri])
            new.append(uri)
    log.info("%d inbox files, %d already scanned, %d new", len(hashes), len(hashes) - len(new), len(new))
    return {"inbox_files": len(hashes), "already_scanned": len(hashes) - len(new), "new": new, "missing_inboxes": missing}


@task(name="beam-scan", retries=2, retry_delay_seconds=RETRY_DELAY_S)
def beam_scan(workspace: str, uris: list[str], scan_id: str, runner: str, runner_options: list[str], device: str) -> dict:
    """One Beam scan; a retry resumes the same scan id, so shards already written are kept."""
    from pipelines.scan import run_scan

    log = get_run_logger()
    started = time.monotonic()
    result = run_scan(Workspace(workspace), uris, scan_id, runner, runner_options, device, progress=log.info)
    result["seconds"] = time.monotonic() - started
    return result


@task(name="unknown-clusters")
def unknown_clusters(workspace: str, scan_id: str, min_size: int = 2) -> list[dict]:
    """Groups of `unknown` images that resemble each other: candidates for a new generator."""
    from lida_core.index import query_decider

    ws = Workspace(workspace)
    table = ws.read_parquet(table_folder("attributions", scan_id),
                            columns=["uri", "image_id", "predicted_source", "model_version"])
    if table is None:
        return []
    unknown: dict[str, str] = {}
    for uri, image_id, source in zip(*(table[c].to_pylist() for c in ("uri", "image_id", "predicted_source")), strict=True):
        if source == "unknown":
            unknown.setdefault(image_id, uri)
    if len(unknown) < min_size:
        return []
    model_version = table["model_version"][len(table) - 1].as_py()
    emb = ws.read_parquet(table_folder("embeddings", model_version), columns=["image_id", "embedding"],
                          name_prefix=f"scan-{scan_id}-")
    vectors: dict[str, np.ndarray] = {}
    if emb is not None:
        for image_id, vector in zip(emb["image_id"].to_pylist(), emb["embedding"].to_numpy(zero_copy_only=False), strict=True):
            if image_id in unknown:
                vectors[image_id] = np.asarray(vector, np.float32)
    ids = sorted(vectors)
    if len(ids) < min_size:
        return []
    emb = np.stack([vectors[i] for i in ids])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    try:  # the open-set threshold: "as similar as two images of one registered source"
        decider, _ = query_decider(ws, model_version, ws.model_meta(model_version), ws.config())
        threshold = decider.unknown_threshold
    except WorkspaceError:  # the index moved on to a newer model since the scan
        threshold = None
    threshold = 0.9 if threshold is None else float(threshold)
    clusters = []
    for members in decide.unknown_clusters(emb, threshold, min_size):
        centre = emb[members].mean(axis=0)
        cohesion = float(np.mean(emb[members] @ centre / (np.linalg.norm(centre) + 1e-12)))
        clusters.append({"size": len(members), "cohesion": cohesion, "threshold": float(threshold),
                         "examples": [unknown[ids[i]] for i in members[:5]]})
    return clusters


def nightly_markdown(scan: dict | None, found: dict, clusters: list[dict], resumed: list[str]) -> str:
    lines = [f"# lida nightly scan {scan['scan_id'] if scan else '(nothing new)'}", ""]
    lines.append(f"- inbox files {found['inbox_files']}, already scanned {found['already_scanned']}, "
                 f"new {len(found['new'])}")
    for inbox in found.get("missing_inboxes", []):
        lines.append(f"- inbox missing: `{inbox}`")
    for scan_id in resumed:
        lines.append(f"- resumed the interrupted scan `{scan_id}`")
    if not scan:
        return "\n".join(lines) + "\n"
    rate = scan["images"] / scan["seconds"] if scan.get("seconds") else 0.0
    lines += [f"- model {scan['model_version']}; {scan['images']} files in {scan['seconds']:.1f} s "
              f"({rate:.1f} files/s end to end)", "", "## By status", "", "| status | files |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(scan["status"].items())]
    lines += ["", "## By predicted source", "", "| predicted source | images |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in scan["predicted"].items()] or ["| (none) | 0 |"]
    lines += ["", "## New `unknown` clusters", ""]
    if clusters:
        lines += ["| size | cohesion | examples |", "|---|---|---|"]
        lines += [f"| {c['size']} | {c['cohesion']:.3f} | " + "<br>".join(f"`{e}`" for e in c["examples"]) + " |"
                  for c in clusters]
    else:
        lines.append("none (no two `unknown` images above the open-set threshold)")
    lines += ["", "## Errors", ""]
    if scan["errors"]:
        lines += ["| file | reason |", "|---|---|"] + [f"| `{u}` | {e} |" for u, e in scan["errors"]]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


@flow(name="lida-nightly-scan", log_prints=True)
def nightly_scan(workspace: str, runner: str = "local", runner_options: list[str] | None = None,
                 device: str = "cpu") -> dict:
    """Scan what is new in the workspace's inboxes; publish counts, clusters, errors and throughput."""
    from lida_core.workspace import scan_ids
    from pipelines.scan import planned_uris

    ws = Workspace(workspace).require()
    options = list(runner_options or [])
    resumed = []
    for scan_id, done in scan_ids(ws).items():
        if scan_id.startswith(PREFIX) and not done:
            beam_scan(workspace, planned_uris(ws, scan_id), scan_id, runner, options, device)
            resumed.append(scan_id)
    found = find_new_files(workspace)
    scan, clusters = None, []
    if found["new"]:
        scan_id = PREFIX + utc_stamp()
        scan = beam_scan(workspace, found["new"], scan_id, runner, options, device)
        clusters = unknown_clusters(workspace, scan_id)
    markdown = nightly_markdown(scan, found, clusters, resumed)
    name = scan["scan_id"] if scan else "nothing-new-" + utc_stamp()
    ws.write_bytes(f"reports/nightly/{name}.md", markdown.encode())
    create_markdown_artifact(markdown, key="lida-nightly-scan", description=f"lida nightly scan of {ws.url}")
    return {"scan": scan, "new_files": len(found["new"]), "already_scanned": found["already_scanned"],
            "resumed": resumed, "unknown_clusters": clusters, "report": ws.uri(f"reports/nightly/{name}.md")}


def run_nightly(workspace: str, **kwargs) -> dict:
    offline_prefect()
    return nightly_scan(workspace, **kwargs)


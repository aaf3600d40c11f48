"""The adaptation flow: a labelled inbox (`<inbox>/<source>/...`) -> gallery add -> adapt -> gate -> reindex.

It runs when the inbox holds a source the gallery does not know yet (a newly labelled
generator), or at least `adapt_min_new` new images of known sources; otherwise it reports that
nothing is due. "New" is by content hash against the gallery of the current model, so a file
that is moved or labelled twice is registered once.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import RETRY_DELAY_S, content_hashes, offline_prefect
from lida_core import gallery
from lida_core.inputs import labelled_folders
from lida_core.workspace import Workspace, WorkspaceError


@task(name="find-newly-labelled", retries=2, retry_delay_seconds=RETRY_DELAY_S)
def find_newly_labelled(workspace: str) -> dict:
    log = get_run_logger()
    ws = Workspace(workspace).require()
    config = ws.config()
    if not config.labelled_inbox:
        raise WorkspaceError(f"workspace {ws.url} has no labelled inbox: 'lida config labelled_inbox PATH' sets it")
    groups = labelled_folders(config.labelled_inbox)
    skipped = []
    for source in list(groups):
        try:
            gallery.check_source_name(source)
        except WorkspaceError as exc:
            log.warning("skipping folder %s: %s", source, exc)
            skipped.append(source)
            del groups[source]
    table = gallery.table(ws, ws.require_model_version())
    known_ids = set(table["image_id"].to_pylist())
    known_sources = sorted(set(table["source"].to_pylist()))
    hashes = content_hashes(ws, [u for uris in groups.values() for u in uris])
    new: dict[str, list[str]] = {}
    for source, uris in groups.items():
        for uri in uris:
            digest = hashes.get(uri)
            if digest and digest not in known_ids:
                known_ids.add(digest)
                new.setdefault(source, []).append(uri)
    new_sources = sorted(s for s in new if s not in known_sources)
    return {"new": new, "new_sources": new_sources, "known_sources": known_sources, "skipped_folders": skipped,
            "new_images": sum(len(v) for v in new.values())}


@task(name="gallery-add", retries=2, retry_delay_seconds=RETRY_DELAY_S)
def gallery_add(workspace: str, source: str, uris: list[str]) -> dict:
    from pipelines.gallery import add

    return add(Workspace(workspace), source, uris)


@task(name="adapt-gate-reindex", retries=1, retry_delay_seconds=RETRY_DELAY_S)
def adapt_gate_reindex(workspace: str, epochs: int | None, seed: int) -> dict:
    from lida_core.lifecycle import adapt_and_reindex

    log = get_run_logger()
    result = adapt_and_reindex(Workspace(workspace), epochs, seed=seed,
                               progress=lambda kind, info: log.info("%s %s", kind, info))
    for line in result.get("advice") or []:
        log.warning("advice: %s", line)
    return result


def adaptation_markdown(found: dict, triggered: str | None, added: dict, result: dict | None, before: dict,
                        after: dict) -> str:
    lines = ["# lida adaptation", ""]
    lines.append(f"- labelled inbox: {found['new_images']} new images; new sources: "
                 f"{', '.join(found['new_sources']) or 'none'}")
    if not triggered:
        lines.append("- nothing due: no new source and fewer new images than `adapt_min_new`")
        return "\n".join(lines) + "\n"
    lines.append(f"- triggered by: {triggered}")
    lines += ["", "| source | images added |", "|---|---|"] + [f"| {s} | {r['added']} |" for s, r in sorted(added.items())]
    if result:
        verdict = (f"promoted ({result['rule']})" if result["promoted"]
                   else f"not promoted (worse on held-out gallery images; rule: {result['rule']})")
        lines += ["", "## Before / after", "", "| | before | after |", "|---|---|---|",
                  f"| model version | {before['model_version']} | {after['model_version']} |",
                  f"| gallery sources | {len(before['sources'])} | {len(after['sources'])} |",
                  f"| gallery images | {before['images']} | {after['images']} |",
                  f"| held-out gallery accuracy | {result['holdout_accuracy_before']:.3f} | "
                  f"{result['holdout_accuracy_after']:.3f} |",
                  "", f"- candidate {result['model_version']}: {verdict}"]
        if result.get("index"):
            lines.append(f"- index {result['index']['index_version']} rebuilt for {result['index']['model_version']}")
        lines += [f"- advice: {line}" for line in result.get("advice") or []]
    return "\n".join(lines) + "\n"


def _gallery_state(ws: Workspace) -> dict:
    summary = gallery.summary(ws)
    return {"model_version": summary["model_version"], "sources": sorted(summary["sources"]),
            "images": sum(summary["sources"].values())}


@flow(name="lida-adaptation", log_prints=True)
def adaptation_flow(workspace: str, epochs: int | None = None, seed: int = 0, force: bool = False) -> dict:
    """Register newly labelled images and, when due, adapt, gate and reindex; report before/after."""
    ws = Workspace(workspace).require()
    found = find_newly_labelled(workspace)
    min_new = ws.config().adapt_min_new
    if found["new_sources"]:
        triggered = "new source " + ", ".join(found["new_sources"])
    elif found["new_images"] >= min_new:
        triggered = f"{found['new_images']} new images (adapt_min_new {min_new})"
    elif force and found["new_images"]:
        triggered = "forced"
    else:
        triggered = None
    before = _gallery_state(ws)
    added, result = {}, None
    if triggered:
        for source, uris in sorted(found["new"].items()):
            added[source] = gallery_add(workspace, source, uris)
        result = adapt_gate_reindex(workspace, epochs, seed)
    after = _gallery_state(ws)
    markdown = adaptation_markdown(found, triggered, added, result, before, after)
    create_markdown_artifact(markdown, key="lida-adaptation", description=f"lida adaptation of {ws.url}")
    return {"triggered": triggered, "found": {k: v for k, v in found.items() if k != "new"},
            "added": {s: r["added"] for s, r in added.items()}, "adaptation": result, "before": before, "after": after,
            "report": markdown}


def run_adaptation(workspace: str, **kwargs) -> dict:
    offline_prefect()
    return adaptation_flow(workspace, **kwargs)

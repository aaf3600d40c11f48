"""The reindex flow: rebuild and publish the gallery's FAISS index (after gallery changes, and weekly)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import RETRY_DELAY_S, offline_prefect
from lida_core.workspace import Workspace


@task(name="rebuild-index", retries=2, retry_delay_seconds=RETRY_DELAY_S)
def rebuild_index(workspace: str) -> dict:
    from lida_core.gallery import reindex

    ws = Workspace(workspace).require()
    with ws.lock("reindex"):
        result = reindex(ws)
    get_run_logger().info("index %s: %d vectors of model %s", result["index_version"], result["count"], result["model_version"])
    return result


@flow(name="lida-reindex", log_prints=True)
def reindex_flow(workspace: str) -> dict:
    """Rebuild the attribution index from the gallery table of the current model; published atomically."""
    result = rebuild_index(workspace)
    markdown = (f"# lida reindex\n\n- index **{result['index_version']}** for model {result['model_version']}\n"
                f"- {result['count']} gallery vectors, {result['dimension']}-d, {result['kind']}\n")
    create_markdown_artifact(markdown, key="lida-reindex", description=f"lida reindex of {workspace}")
    return result


def run_reindex(workspace: str) -> dict:
    offline_prefect()
    return reindex_flow(workspace)

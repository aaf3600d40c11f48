"""`lida serve`: the three deployments on the workspace's cron schedules, served against a Prefect server."""

from __future__ import annotations

import os

from flows.adapt import adaptation_flow
from flows.common import offline_prefect
from flows.nightly import nightly_scan
from flows.reindex import reindex_flow
from lida_core.workspace import DEFAULT_SCHEDULES, Workspace, WorkspaceError

DEPLOYMENTS = {"scan": "nightly-scan", "reindex": "reindex", "adapt": "adaptation"}


def deployments(ws: Workspace, runner: str = "local", runner_options: list[str] | None = None, device: str = "cpu") -> list:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    config = ws.config()
    for job, cron in config.schedules.items():
        try:
            CronSchedule(cron=cron)
        except ValueError:
            raise WorkspaceError(f"config.json: schedules.{job} = {cron!r} is not a cron expression") from None
    schedules = {**DEFAULT_SCHEDULES, **config.schedules}
    # One run of each at a time: an overlapping run waits in Prefect's queue instead of failing on the lock.
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["lida"], "concurrency_limit": 1}

    def at(job: str):
        return Cron(schedules[job], timezone=config.timezone)

    return [
        nightly_scan.to_deployment(DEPLOYMENTS["scan"], schedule=at("scan"), **common, parameters={
            "workspace": ws.url, "runner": runner, "runner_options": list(runner_options or []), "device": device},
            description="scan what is new in the workspace's inboxes"),
        reindex_flow.to_deployment(DEPLOYMENTS["reindex"], schedule=at("reindex"), **common,
                                   parameters={"workspace": ws.url}, description="rebuild the gallery index"),
        adaptation_flow.to_deployment(DEPLOYMENTS["adapt"], schedule=at("adapt"), **common,
                                      parameters={"workspace": ws.url},
                                      description="newly labelled images -> gallery -> adapt -> gate -> reindex"),
    ]


def serve(ws: Workspace, runner: str = "local", runner_options: list[str] | None = None, device: str = "cpu") -> None:
    offline_prefect()
    from prefect.settings import PREFECT_API_URL

    if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        raise WorkspaceError("lida serve needs a Prefect server for its schedules: run 'prefect server start' and "
                             "set PREFECT_API_URL=http://127.0.0.1:4200/api")
    ws.require()
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(ws, runner, runner_options, device))

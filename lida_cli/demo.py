"""`lida demo`: the main job on the bundled samples in a fresh workspace, in a few minutes on a laptop CPU.

Steps: write samples (real crops of the photos bundled with scikit-image + six seeded synthetic
decoders), init (srm profile, the CPU default), pretrain on real images only, gallery add (5 per source),
adapt (with the promotion gate), scan an inbox of unseen images through Beam, and write the
HTML report. The demo folder holds a marker file; an existing folder without it is refused.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

from lida_core import lifecycle, samples
from lida_core.workspace import Workspace, WorkspaceError

MARKER = ".lida-demo"
SHOTS = 5


def run_demo(directory: str, say: Callable[[str], None], pretrain_epochs: int = 3, adapt_epochs: int = 40,
             scan_per_source: int = 8, runner: str = "local", runner_options: list[str] | None = None,
             pretrain_images: int = 48) -> dict:
    from lida_core.lifecycle import adapt_and_reindex
    from lida_core.report import write_report
    from pipelines.gallery import add
    from pipelines.scan import run_scan

    root = os.path.abspath(directory)
    if os.path.exists(root):
        if not os.path.exists(os.path.join(root, MARKER)):
            raise WorkspaceError(f"{root} exists and is not a lida demo folder; pass another --dir")
        shutil.rmtree(root)
    os.makedirs(root)
    with open(os.path.join(root, MARKER), "w") as handle:
        handle.write("made by 'lida demo'; deleted and remade by the next one\n")
    started = time.monotonic()

    def step(message: str):
        say(f"[{time.monotonic() - started:5.0f}s] {message}")

    step("writing the bundled samples (real photo crops + 6 synthetic generators)")
    data = os.path.join(root, "samples")
    samples.write_samples(os.path.join(data, "pretrain"), pretrain_images, sources=[samples.REAL], start=10000)
    samples.write_samples(os.path.join(data, "labelled"), SHOTS)
    samples.write_samples(os.path.join(data, "inbox"), scan_per_source, start=1000)
    ws_url = os.path.join(root, "workspace")
    ws = Workspace(ws_url)

    step("init: srm profile (the CPU model), model v0000")
    lifecycle.init_workspace(ws_url, "srm")
    step(f"pretrain: a closed-form fit on {pretrain_images} real images (no labels, no generator images)")
    pre = lifecycle.pretrain_version(ws, [os.path.join(data, "pretrain")], epochs=pretrain_epochs)
    step(f"gallery add: {SHOTS} images for each of {len(samples.sample_sources())} sources")
    for source in samples.sample_sources():
        add(ws, source, [os.path.join(data, "labelled", source)], runner=runner, runner_options=list(runner_options or []))
    step("adapt: the closed-form few-shot fit on the gallery, promotion gate, reindex")
    adapted = adapt_and_reindex(ws, adapt_epochs)
    step(f"scan: {scan_per_source * len(samples.sample_sources())} unseen images through the Beam pipeline")
    scan = run_scan(ws, [os.path.join(data, "inbox")], "demo", runner, list(runner_options or []), "cpu",
                    progress=lambda m: say("    " + m))
    step("report: one self-contained HTML file")
    report = write_report(ws, "demo")
    correct = _scan_accuracy(ws)
    return {
        "workspace": ws_url, "report": report["report"], "tables": ws.uri("tables"),
        "pretrain_model": pre["model_version"], "adapted_model": adapted["model_version"],
        "promoted": adapted["promoted"], "scan": scan, "attribution_accuracy_on_inbox": correct,
        "seconds": time.monotonic() - started,
        "query_example": f"lida --workspace {ws_url} query \"select predicted_source, count(*) n, "
                         f"avg(top1_similarity) sim from attributions group by 1 order by n desc\"",
    }


def _scan_accuracy(ws: Workspace) -> float:
    """The inbox files are named <source>_<index>.png: how many the demo attributed to their source."""
    from lida_core.query import run_query

    _, rows = run_query(ws, "select uri, predicted_source from attributions where scan_id = 'demo'")
    if not rows:
        return float("nan")
    hits = sum(os.path.basename(os.path.dirname(uri)) == predicted for uri, predicted in rows)
    return hits / len(rows)


__all__ = ["run_demo", "MARKER"]

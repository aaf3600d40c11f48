"""Verb order and kill -9 at every step: the next run of a verb completes or repairs what a killed one left (issue #12)."""

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from conftest import json_out, run_lida
from lida_core.workspace import Workspace

SOURCES = ("real", "tconv_gan", "vae_ldm")


def killed(ws, *args, at):
    """Run a verb with the process killed (SIGKILL) at the named failpoint; asserts it died there."""
    r = run_lida(ws, *args, check=False, env={"LIDA_FAIL_AT": at})
    assert r.returncode in (-9, 137), f"{at} was not reached: {r.returncode} {r.stderr[-500:]}"
    return r


def gallery_counts(ws):
    return json_out(run_lida(ws, "gallery", "list"))["sources"]


def index_counts(ws):
    root = Path(ws) / "indexes"
    version = root / (root / "CURRENT").read_text().strip()
    manifest = json.loads((version / "manifest.json").read_text())
    sources = pq.read_table(version / manifest["ids"]).column("source").to_pylist()
    assert manifest["source_counts"] == {s: sources.count(s) for s in set(sources)}
    return manifest["model_version"], manifest["source_counts"]


def scan_lineage(ws, scan_id):
    """(model version, index version) the scan's rows carry, and whether that index was built for that model."""
    rows = duckdb.sql(f"select distinct model_version, index_version from read_parquet('{ws}/tables/attributions/"
                      f"scan_id={scan_id}/*.parquet')").fetchall()
    assert len(rows) == 1
    model, index = rows[0]
    manifest = json.loads((Path(ws) / "indexes" / index / "manifest.json").read_text())
    return model, index, manifest["model_version"] == model


@pytest.fixture(scope="module")
def ready(tmp_path_factory, sample_dirs):
    """A workspace of the CPU default profile with a gallery of three sources (kept as a template)."""
    ws = tmp_path_factory.mktemp("recovery") / "ws"
    run_lida(ws, "init")
    run_lida(ws, "pretrain", str(sample_dirs / "pretrain"))
    for source in SOURCES:
        run_lida(ws, "gallery", "add", "--source", source, str(sample_dirs / "labelled" / source))
    return ws


@pytest.mark.slow
def test_pretrain_after_gallery_adds_keeps_every_source_and_an_empty_gallery_reindexes(tmp_path, sample_dirs):
    ws = tmp_path / "ws"
    run_lida(ws, "init", "--profile", "small")
    empty = json_out(run_lida(ws, "reindex"))  # used to fail: "cannot reshape array of size 0"
    assert empty["count"] == 0 and empty["dimension"] > 0
    for source in ("real", "tconv_gan"):
        run_lida(ws, "gallery", "add", "--source", source, str(sample_dirs / "labelled" / source))
    before = gallery_counts(ws)
    r = json_out(run_lida(ws, "pretrain", str(sample_dirs / "pretrain"), "--epochs", "1", "--batch-size", "8"))
    assert gallery_counts(ws) == before == {"real": 6, "tconv_gan": 6}
    assert index_counts(ws) == (r["model_version"], before)  # the new model's own index, built before it became current
    run_lida(ws, "gallery", "add", "--source", "real", str(sample_dirs / "labelled" / "real"))  # a re-add keeps the others
    assert gallery_counts(ws) == before
    assert json_out(run_lida(ws, "reindex"))["count"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("point", ["adapt:published", "adapt:gallery", "adapt:indexed", "adapt:current"])
def test_adapt_killed_at_any_step_leaves_scans_working(ready, sample_dirs, tmp_path, point):
    ws = tmp_path / "ws"
    shutil.copytree(ready, ws)
    before = (Path(ws) / "models" / "CURRENT").read_text().strip()
    killed(ws, "adapt", at=point)
    current = (Path(ws) / "models" / "CURRENT").read_text().strip()
    assert (current != before) == (point == "adapt:current")
    scan = json_out(run_lida(ws, "scan", str(sample_dirs / "labelled" / "vae_ldm"), "--scan-id", "after"))
    assert scan["status"] == {"ok": 6}
    model, _, matches = scan_lineage(ws, "after")
    assert model == current and matches  # the current model, decided against its own index, no manual reindex
    again = json_out(run_lida(ws, "adapt"))  # the next run completes
    assert again["promoted"] and again["index"]["model_version"] == again["model_version"]
    # Killed after CURRENT moved, the rerun refits the gallery the current model was fitted on:
    # that model's leave-out accuracy is in-sample, so the gate does not hold the refit back.
    rule = Workspace(str(ws)).model_meta(again["model_version"])["promotion"]["rule"]
    assert rule.startswith("closed-form refit" if point == "adapt:current" else "first gallery fit"), rule


def test_init_killed_before_its_config_is_written_can_be_run_again(tmp_path):
    ws = tmp_path / "ws"
    killed(ws, "init", "--profile", "small", at="init:model")
    assert not (ws / "config.json").exists()
    r = json_out(run_lida(ws, "init", "--profile", "small"))
    assert r["model_version"] == "v0000"
    assert json_out(run_lida(ws, "gallery", "list"))["images"] == 0


@pytest.mark.slow
def test_gallery_add_killed_lists_only_what_the_index_holds_and_a_rerun_completes(ready, sample_dirs, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(ready, ws)
    before = gallery_counts(ws)
    new_source = sample_dirs / "labelled" / "style_noise"
    for point in ("gallery:staged", "gallery:indexed"):
        killed(ws, "gallery", "add", "--source", "style_noise", str(new_source), at=point)
        listed = gallery_counts(ws)
        assert listed == before, point
        held = index_counts(ws)[1]
        assert {s: n for s, n in held.items() if s in listed} == listed, point
    r = json_out(run_lida(ws, "gallery", "add", "--source", "style_noise", str(new_source)))
    assert gallery_counts(ws) == {**before, "style_noise": 6} == index_counts(ws)[1]
    assert r["added"] + r["already_registered"] == 6


def test_gallery_add_takes_a_name_that_is_not_utf8_and_the_index_pointer_must_stay_inside(ready, sample_dirs, tmp_path):
    """Issue #12 items 1 and 14."""
    import os

    ws = tmp_path / "ws"
    shutil.copytree(ready, ws)
    folder = tmp_path / "odd"
    folder.mkdir()
    source = sorted((sample_dirs / "labelled" / "style_noise").iterdir())[0]
    (folder / os.fsdecode(b"gen\xfe.png")).write_bytes(source.read_bytes())
    r = json_out(run_lida(ws, "gallery", "add", "--source", "style_noise", str(folder)))
    assert r["added"] == 1 and not r["errors"]
    uris = json_out(run_lida(ws, "query", "select uri from gallery where source = 'style_noise'"))
    assert [Path(u["uri"]).name for u in uris] == ["gen\\xfe.png"]
    elsewhere = tmp_path / "elsewhere" / "i0008"
    shutil.copytree(ws / "indexes" / (ws / "indexes" / "CURRENT").read_text().strip(), elsewhere)
    (ws / "indexes" / "CURRENT").write_text("../../elsewhere/i0008\n")
    refused = run_lida(ws, "scan", str(folder), "--scan-id", "pointer", check=False)
    assert refused.returncode == 2 and "not an index version" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_old_index_versions_are_pruned_and_the_kind_is_named(ready, tmp_path):
    """Issue #14: a demo left 12 index versions and every manifest said kind "Index"."""
    from lida_core import index as gallery_index
    from lida_core.gallery import reindex
    from lida_core.workspace import Workspace

    ws = tmp_path / "ws"
    shutil.copytree(ready, ws)
    workspace = Workspace(str(ws))
    for _ in range(7):
        built = reindex(workspace)
    names = gallery_index.versions(workspace)
    assert len(names) == gallery_index.KEEP_INDEXES and names[-1] == built["index_version"]
    assert built["kind"] == "IndexFlatIP"
    model, held = index_counts(ws)
    assert held == gallery_counts(ws)

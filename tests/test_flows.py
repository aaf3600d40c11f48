"""Every flow through Prefect (one session-wide test harness) on real data, Beam scans included."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import duckdb
import pytest

from conftest import LIDA, run_lida
from lida_core import samples
from lida_core.workspace import Workspace, WorkspaceError

os.environ["LIDA_RETRY_DELAY_S"] = "0"  # before the flows are imported: a busy workspace fails at once

from flows.adapt import adaptation_flow  # noqa: E402
from flows.nightly import nightly_scan  # noqa: E402
from flows.reindex import reindex_flow  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield PREFECT_API_URL.value()


def artifact(key):
    from prefect.artifacts import Artifact

    found = Artifact.get(key)
    assert found is not None, f"no artifact {key}"
    return found.data


@pytest.fixture(scope="module")
def flow_ws(tmp_path_factory, sample_dirs):
    root = tmp_path_factory.mktemp("flows")
    ws = root / "ws"
    run_lida(ws, "init", "--profile", "small")
    run_lida(ws, "pretrain", str(sample_dirs / "pretrain"), "--epochs", "1", "--batch-size", "8")
    for source in ("real", "tconv_gan"):
        run_lida(ws, "gallery", "add", "--source", source, str(sample_dirs / "labelled" / source))
    inbox, labelled = root / "inbox", root / "labelled"
    inbox.mkdir()
    labelled.mkdir()
    run_lida(ws, "config", "inboxes", str(inbox), str(root / "second-inbox-not-there-yet"))
    run_lida(ws, "config", "labelled_inbox", str(labelled))
    return ws, inbox, labelled


def nightly_rows(ws, table, scan_id):
    return duckdb.sql(f"select count(*) from read_parquet('{ws}/tables/{table}/**/*.parquet', hive_partitioning=true) "
                      f"where scan_id = '{scan_id}'").fetchall()[0][0]


def test_nightly_scans_only_new_content(prefect_api, flow_ws):
    ws, inbox, _ = flow_ws
    samples.write_samples(str(inbox / "day1"), 3, sources=["real", "vae_ldm"], start=500)
    (inbox / "day1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")

    first = nightly_scan(str(ws))
    scan = first["scan"]
    assert first["new_files"] == 7 and first["already_scanned"] == 0
    assert scan["status"] == {"ok": 6, "error": 1}
    assert nightly_rows(ws, "attributions", scan["scan_id"]) == 6
    assert nightly_rows(ws, "images", scan["scan_id"]) == 7
    markdown = artifact("lida-nightly-scan")
    assert scan["scan_id"] in markdown and "| ok | 6 |" in markdown and "broken.png" in markdown
    assert "files/s end to end" in markdown and "second-inbox-not-there-yet" in markdown
    assert Workspace(str(ws)).exists(f"reports/nightly/{scan['scan_id']}.md")

    # Day 2: two new images, one old image moved, one old image re-uploaded under a new name.
    samples.write_samples(str(inbox / "day2"), 1, sources=["real", "nearest_unet"], start=900)
    (inbox / "moved").mkdir()
    shutil.move(inbox / "day1" / "real" / "real_00500.png", inbox / "moved" / "renamed.png")
    shutil.copy(inbox / "day1" / "vae_ldm" / "vae_ldm_00501.png", inbox / "moved" / "again.png")
    time.sleep(1.1)  # a new scan id (second resolution)
    second = nightly_scan(str(ws))
    assert second["new_files"] == 2 and second["already_scanned"] == 8  # 7 seen + 1 copy of a seen one
    assert second["scan"]["images"] == 2 and second["scan"]["status"] == {"ok": 2}
    assert nightly_rows(ws, "attributions", second["scan"]["scan_id"]) == 2

    third = nightly_scan(str(ws))
    assert third["scan"] is None and third["new_files"] == 0
    assert "nothing new" in artifact("lida-nightly-scan")


def test_nightly_resumes_an_interrupted_scan(prefect_api, flow_ws):
    ws, inbox, _ = flow_ws
    w = Workspace(str(ws))
    samples.write_samples(str(inbox / "day3"), 2, sources=["style_noise"], start=700)
    files = sorted(str(p) for p in (inbox / "day3").rglob("*.png"))
    # A scan the nightly flow planned and then lost (the process died before done.json).
    run_lida(ws, "scan", *files, "--scan-id", "nightly-20000101T000000Z")
    w.fs.rm(w.path("shards/nightly-20000101T000000Z/done.json"))
    result = nightly_scan(str(ws))
    assert result["resumed"] == ["nightly-20000101T000000Z"]
    assert w.exists("shards/nightly-20000101T000000Z/done.json")
    assert result["new_files"] == 0  # its files count as scanned once it finished
    assert nightly_rows(ws, "attributions", "nightly-20000101T000000Z") == 2


def test_reindex_flow_and_a_busy_workspace(prefect_api, flow_ws):
    ws, _, _ = flow_ws
    w = Workspace(str(ws))
    before = w.read_bytes("indexes/CURRENT").decode().strip()
    result = reindex_flow(str(ws))
    assert result["index_version"] > before and result["count"] == 12
    assert result["index_version"] in artifact("lida-reindex")
    with w.lock("test holds the workspace"):
        state = reindex_flow(str(ws), return_state=True)
    assert state.is_failed()
    with pytest.raises(WorkspaceError, match="busy: test holds the workspace"):
        state.result()
    assert w.read_bytes("indexes/CURRENT").decode().strip() == result["index_version"]


def test_adaptation_runs_for_a_newly_labelled_source(prefect_api, flow_ws, sample_dirs):
    ws, _, labelled = flow_ws
    w = Workspace(str(ws))
    shutil.copytree(sample_dirs / "labelled" / "real", labelled / "real")  # already in the gallery
    nothing = adaptation_flow(str(ws))
    assert nothing["triggered"] is None and nothing["found"]["new_images"] == 0
    assert "nothing due" in artifact("lida-adaptation")

    shutil.copytree(sample_dirs / "labelled" / "shuffle_sr", labelled / "shuffle_sr")
    (labelled / "not a name!").mkdir()
    model_before = w.current_model_version()
    result = adaptation_flow(str(ws), epochs=3)
    assert result["triggered"] == "new source shuffle_sr"
    assert result["added"] == {"shuffle_sr": 6}
    assert result["after"]["sources"] == ["real", "shuffle_sr", "tconv_gan"]
    adapted = result["adaptation"]
    assert adapted["parent"] == model_before
    if adapted["promoted"]:
        assert w.current_model_version() == adapted["model_version"]
        assert adapted["index"]["model_version"] == adapted["model_version"]
    markdown = artifact("lida-adaptation")
    assert "held-out gallery accuracy" in markdown and adapted["model_version"] in markdown
    assert adapted["rule"] in markdown  # which promotion rule decided, as `lida adapt` prints it

    again = adaptation_flow(str(ws))
    assert again["triggered"] is None


@pytest.mark.slow
def test_serve_registers_the_three_schedules(prefect_api, flow_ws):
    from prefect.client.orchestration import get_client

    ws, _, _ = flow_ws
    run_lida(ws, "config", "schedules.scan", "30 1 * * *")
    run_lida(ws, "config", "timezone", "Europe/Paris")
    assert run_lida(ws, "config", "timezone", "Mars/Olympus", check=False).returncode == 2
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    proc = subprocess.Popen([LIDA, "--workspace", str(ws), "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, found = time.monotonic() + 240, {}
        while time.monotonic() < deadline and len(found) < 3:
            assert proc.poll() is None, proc.stdout.read()
            with get_client(sync_client=True) as client:
                found = {d.name: d for d in client.read_deployments() if "lida" in (d.tags or [])}
            time.sleep(2)
        crons = {name: [s.schedule.cron for s in d.schedules] for name, d in found.items()}
        assert crons == {"nightly-scan": ["30 1 * * *"], "reindex": ["0 3 * * 0"], "adaptation": ["0 4 * * 0"]}
        zones = {s.schedule.timezone for d in found.values() for s in d.schedules}
        assert zones == {"Europe/Paris"}
        assert all(d.global_concurrency_limit.limit == 1 for d in found.values())  # an overlapping run queues
        assert found["nightly-scan"].parameters["workspace"] == str(ws)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_without_a_server_is_one_clear_error(flow_ws):
    ws, _, _ = flow_ws
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([LIDA, "--workspace", str(ws), "serve"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("lida: error: lida serve needs a Prefect server")


def _report(flow_ws, sample_dirs, tmp_path):
    ws, _, _ = flow_ws
    run_lida(ws, "scan", str(sample_dirs / "labelled" / "vae_ldm"), "--scan-id", "for-report")
    run_lida(ws, "eval", str(sample_dirs / "labelled"), "--shots", "2", "--no-adapt")
    out = tmp_path / "report.html"
    info = run_lida(ws, "report", "--output", str(out))
    return ws, out, json.loads(info.stdout)


def test_report_is_one_self_contained_file(flow_ws, sample_dirs, tmp_path):
    ws, out, info = _report(flow_ws, sample_dirs, tmp_path)
    page = out.read_text()
    assert info["scan_id"] == "for-report"  # the latest finished scan by default
    assert info["files"] == 6 and info["model_versions"] == [Workspace(str(ws)).current_model_version()]
    assert page.count("<svg") == 5  # status, sources, two histograms, projection
    assert page.count('class="threshold"') == 2 and "real threshold" in page and "unknown threshold" in page
    assert 'class="confusion"' in page  # the latest lida eval
    for external in ("http://", "https://", "<script", "<link", "src="):
        assert external not in page
    by_id = run_lida(ws, "report", "--scan-id", info["scan_id"])
    assert json.loads(by_id.stdout)["report"].endswith(f"reports/{info['scan_id']}.html")
    missing = run_lida(ws, "report", "--scan-id", "no-such-scan", check=False)
    assert missing.returncode == 2 and "not finished (or does not exist)" in missing.stderr


@pytest.mark.slow
def test_report_renders_in_headless_chromium(flow_ws, sample_dirs, tmp_path):
    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian's chromium package is needed for this test (.ci/run installs it)")
    _, out, _ = _report(flow_ws, sample_dirs, tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 5 and "lida scan report" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1000,2600", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    coloured = np.abs(pixels.astype(int) - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 40
    assert coloured.mean() > 0.005  # the bars, histograms and points were drawn in colour


def test_flow_verb_runs_a_flow_from_the_command_line(prefect_api, flow_ws):
    ws, _, _ = flow_ws
    result = run_lida(ws, "flow", "reindex", env={"PREFECT_API_URL": prefect_api})
    out = json.loads(result.stdout)
    assert out["index_version"] == Workspace(str(ws)).read_bytes("indexes/CURRENT").decode().strip()
    assert "Task run" not in result.stderr  # --json: the answer on stdout, no chatter
    # Without --json, Prefect's own console lines: run and task names, and their states (issue #14).
    said = subprocess.run([LIDA, "--workspace", str(ws), "flow", "reindex"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PREFECT_API_URL=prefect_api))
    assert said.returncode == 0, said.stderr[-2000:]
    assert re.search(r"\| INFO +\| Flow run '[\w-]+' - Beginning flow run", said.stderr), said.stderr[-2000:]
    assert re.search(r"\| INFO +\| Task run 'rebuild-index-\w+' - Finished in state Completed", said.stderr), said.stderr[-2000:]


def _prefect_servers():
    listed = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
    return {int(line.split(None, 1)[0]) for line in listed if "uvicorn" in line and "prefect" in line}


@pytest.mark.slow
def test_a_flow_command_piped_returns_and_leaves_no_prefect_server(flow_ws):
    """Issue #12 item 6: the command's temporary Prefect server stops with it."""
    ws, _, _ = flow_ws
    before = _prefect_servers()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # its own temporary server
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    r = subprocess.run(f"'{LIDA}' --workspace '{ws}' flow reindex | cat", shell=True, capture_output=True, text=True,
                        timeout=400, env=env)
    assert r.returncode == 0 and "index i" in r.stdout, r.stderr[-2000:]
    time.sleep(1)
    assert _prefect_servers() - before == set()


def test_nightly_does_not_block_on_a_fifo_and_takes_names_that_are_not_utf8(prefect_api, flow_ws, sample_dirs):
    """Issue #12 items 1 and 3 through the nightly flow: both get their rows, and a second night skips them."""
    ws, inbox, _ = flow_ws
    odd = inbox / "odd"
    odd.mkdir()
    os.mkfifo(odd / "pipe.png")
    source = sorted((sample_dirs / "labelled" / "vae_ldm").iterdir())[-1]
    (odd / os.fsdecode(b"night\xff.png")).write_bytes(source.read_bytes()[:-1] + b"\x01")
    first = nightly_scan(str(ws))
    rows = dict(duckdb.sql(f"select uri, status from read_parquet('{ws}/tables/images/**/*.parquet', hive_partitioning=true) "
                           f"where scan_id = '{first['scan']['scan_id']}'").fetchall())
    names = {os.path.basename(u): s for u, s in rows.items()}
    assert names["pipe.png"] == "error" and names["night\\xff.png"] in ("ok", "error")
    again = nightly_scan(str(ws))
    assert again["new_files"] == 0


def test_content_hashes_read_in_parallel_are_each_files_sha256_and_cached(tmp_path):
    """Issue #14: inbox hashing runs on threads; every file keeps its own hash, and unchanged files are not read again."""
    import hashlib

    from flows.common import HASH_CACHE, content_hashes

    ws = Workspace(str(tmp_path / "ws"))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    uris = []
    for i in range(1203):  # more than one block of 500, and a partial last block
        path = inbox / f"f{i:05d}.bin"
        path.write_bytes(os.urandom(64) + i.to_bytes(4, "little"))
        uris.append(str(path))
    uris.append(str(inbox / "gone.bin"))  # listed, then removed: no hash, no cache entry
    seen = []
    hashes = content_hashes(ws, uris, lambda n, total: seen.append((n, total)))
    assert hashes == {u: hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in uris[:-1]}
    assert seen[-1] == (len(uris), len(uris)) and len(seen) == 3
    assert ws.exists(HASH_CACHE)
    Path(uris[7]).write_bytes(b"changed, and longer than before")
    # Same size and stamp: taken from the cache, so the old hash comes back although the bytes changed.
    stamp = os.stat(uris[3])
    Path(uris[3]).write_bytes(b"x" * stamp.st_size)
    os.utime(uris[3], ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    again = content_hashes(ws, uris[:-1])
    assert again[uris[7]] == hashlib.sha256(b"changed, and longer than before").hexdigest()
    assert again[uris[3]] == hashes[uris[3]]
    assert {u: again[u] for u in uris[8:-1]} == {u: hashes[u] for u in uris[8:-1]}

"""`lida scan` on real runners: hostile files, exactly-once after kill -9, local == dask, the index."""

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import tarfile
import threading
import time
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from conftest import LIDA, json_out, run_lida
from lida_core import index as gallery_index
from lida_core.gallery import reindex
from lida_core.workspace import Workspace


def q(ws, sql):
    tables = {t: f"read_parquet('{ws}/tables/{t}/**/*.parquet', hive_partitioning=true)" for t in ("images", "attributions", "embeddings")}
    return duckdb.sql(sql.format(**tables)).fetchall()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, sample_dirs):
    ws = tmp_path_factory.mktemp("scan") / "ws"
    run_lida(ws, "init", "--profile", "small")
    run_lida(ws, "pretrain", str(sample_dirs / "pretrain"), "--epochs", "1", "--batch-size", "8")
    for source in ("real", "tconv_gan", "vae_ldm"):
        run_lida(ws, "gallery", "add", "--source", source, str(sample_dirs / "labelled" / source))
    return ws


def _png_header_only(width, height):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory, sample_dirs):
    d = tmp_path_factory.mktemp("hostile")
    good = sorted((sample_dirs / "labelled" / "tconv_gan").glob("*.png"))[:3]
    for i, path in enumerate(good):
        shutil.copy(path, d / f"good {i} é.png")
    shutil.copy(good[0], d / "sub_copy.png")  # same bytes as "good 0 é.png": a duplicate
    (d / "zero.jpg").write_bytes(b"")
    (d / "page.jpg").write_bytes(b"<html><body>not an image</body></html>")
    data = (d / "good 1 é.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 3])
    (d / "bomb.png").write_bytes(_png_header_only(60_000, 60_000))
    rng = np.random.default_rng(0)
    Image.fromarray((rng.integers(0, 256, (40, 40)) * 257).astype(np.uint16)).save(d / "sixteen.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "CMYK").save(d / "cmyk.jpg", quality=95)
    palette = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert("P")
    palette.save(d / "palette_alpha.png", transparency=0)
    frames = [Image.new("RGB", (30, 30), c) for c in ((200, 10, 10), (10, 200, 10))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "one.png")
    return d


def test_hostile_files_each_get_one_row_and_the_scan_succeeds(workspace, hostile_dir):
    r = json_out(run_lida(workspace, "scan", str(hostile_dir), "--scan-id", "hostile"))
    files = sorted(p.name for p in hostile_dir.iterdir())
    rows = q(workspace, "select uri, status, error from {images} where scan_id = 'hostile' order by uri")
    assert sorted(Path(u).name for u, _, _ in rows) == files
    status = {Path(u).name: (s, e) for u, s, e in rows}
    for name in ("zero.jpg", "page.jpg", "truncated.png", "bomb.png"):
        assert status[name][0] == "error" and status[name][1], name
    assert "decompression bomb" in status["bomb.png"][1] and "empty" in status["zero.jpg"][1]
    for name in ("sixteen.png", "cmyk.jpg", "palette_alpha.png", "animated.gif", "one.png", "good 0 é.png"):
        assert status[name] == ("ok", None), name
    quality = {Path(u).name: v for u, v in q(workspace, "select uri, jpeg_quality from {images} where scan_id = 'hostile'")}
    assert {n: v for n, v in quality.items() if v is not None} == {"cmyk.jpg": 95}  # the one decoded JPEG's quality
    duplicates = [n for n in ("good 0 é.png", "sub_copy.png") if status[n][0] == "duplicate"]
    assert duplicates == ["sub_copy.png"]  # the first URI keeps the image
    attributed = q(workspace, "select uri, count(*) from {attributions} where scan_id = 'hostile' group by uri")
    ok = {u for u, s, _ in rows if s == "ok"}
    assert {u for u, _ in attributed} == ok and all(c == 1 for _, c in attributed)
    assert r["status"] == {"ok": 8, "error": 4, "duplicate": 1}
    # the recorded member offsets are where tarfile itself finds each member's bytes

    for tar_path in (Path(workspace) / "shards" / "hostile").glob("*.tar"):
        offsets = json.loads(tar_path.with_suffix(".members.json").read_text())
        with tarfile.open(tar_path) as tar:
            found = {m.name.split(".", 1)[0]: [m.offset_data, m.size] for m in tar.getmembers() if not m.name.endswith(".json")}
        assert found == offsets
    lineage = q(workspace, "select distinct model_version, index_version, fingerprint from {attributions} where scan_id='hostile'")
    assert len(lineage) == 1 and lineage[0][1].startswith("i") and lineage[0][2] == "b3-scale-full-crop128"


@pytest.fixture()
def odd_entries_dir(tmp_path, hostile_dir):
    """Issue #12 items 1, 3 and 12: entries a folder walk used to skip, block on, or die on."""
    d = tmp_path / "odd"
    d.mkdir()
    good = (hostile_dir / "good 1 é.png").read_bytes()
    (d / os.fsdecode(b"bad\xff.png")).write_bytes(good)  # a name that is not UTF-8
    (d / ".hidden.png").write_bytes((hostile_dir / "one.png").read_bytes())
    (d / "noext").write_bytes((hostile_dir / "sixteen.png").read_bytes())
    (d / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    with tarfile.open(d / "bundle.tar", "w") as tar:
        tar.add(hostile_dir / "one.png", arcname="one.png")
    (d / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(d / "pipe.png")
    with open(d / "huge.png", "wb") as handle:  # sparse: over the byte cap without using the disk
        handle.truncate(300 * 1024 * 1024)
    return d


def test_every_entry_gets_a_row_and_nothing_blocks_or_dies(workspace, odd_entries_dir):
    r = json_out(run_lida(workspace, "scan", str(odd_entries_dir), "--scan-id", "odd", timeout=300))
    rows = {Path(u).name: (s, e) for u, s, e in q(workspace, "select uri, status, error from {images} where scan_id = 'odd'")}
    assert sorted(rows) == sorted(["bad\\xff.png", ".hidden.png", "noext", "photo.heic", "bundle.tar", "zero.png", "pipe.png",
                                   "huge.png"])
    assert rows["bad\\xff.png"] == ("ok", None) and rows[".hidden.png"] == ("ok", None) and rows["noext"] == ("ok", None)
    assert "tar archive" in rows["bundle.tar"][1] and "HEIF" in rows["photo.heic"][1]
    assert "FIFO" in rows["pipe.png"][1] and "character device" in rows["zero.png"][1] and "too large" in rows["huge.png"][1]
    assert r["status"] == {"ok": 3, "error": 5}
    assert r["seconds"] > 0 and r["files_per_second"] == pytest.approx(8 / r["seconds"], rel=0.01)  # the rate it prints
    counters = r["counters"]  # Beam Metrics from the shard stage
    assert counters["files"] == 8 and counters["errors.unreadable"] == 3 and counters["errors.not an image"] == 2
    assert counters["bytes"] == sum(os.path.getsize(odd_entries_dir / n) for n in (".hidden.png", "noext", "photo.heic", "bundle.tar")) \
        + len((odd_entries_dir / os.fsdecode(b"bad\xff.png")).read_bytes())
    attributed = q(workspace, "select uri from {attributions} where scan_id = 'odd'")
    assert sorted(Path(u).name for (u,) in attributed) == [".hidden.png", "bad\\xff.png", "noext"]
    # the plan keeps the name: with the file gone, the same scan id still runs and records it unreadable
    os.remove(odd_entries_dir / os.fsdecode(b"bad\xff.png"))
    shutil.rmtree(Path(workspace) / "tables" / "attributions" / "scan_id=odd")
    again = json_out(run_lida(workspace, "scan", str(odd_entries_dir), "--scan-id", "odd", timeout=300))
    assert again["images"] == 8


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_an_unreadable_folder_gets_an_error_row(workspace, hostile_dir, tmp_path):
    d = tmp_path / "locked_parent"
    (d / "locked").mkdir(parents=True)
    shutil.copy(hostile_dir / "one.png", d / "locked" / "one.png")
    shutil.copy(hostile_dir / "one.png", d / "open.png")
    (d / "locked").chmod(0)
    try:
        json_out(run_lida(workspace, "scan", str(d), "--scan-id", "locked"))
    finally:
        (d / "locked").chmod(0o755)
    rows = {Path(u).name: (s, e) for u, s, e in q(workspace, "select uri, status, error from {images} where scan_id = 'locked'")}
    assert rows["open.png"] == ("ok", None) and rows["locked"][0] == "error"


def test_a_shard_holds_a_bounded_number_of_decoded_pixels(workspace, tmp_path):
    """Issue #12 item 2: chunks of decoded images are cut by pixels as well as by count."""
    from pipelines import scan

    d = tmp_path / "wide"
    d.mkdir()
    for i in range(6):
        Image.new("RGB", (1000, 1000), (i, 2 * i, 3)).save(d / f"{i}.png")
    ws = Workspace(str(workspace))
    scan.plan_scan(ws, "pixels", [str(d)], shard_size=6)
    stage = scan.ShardAndDecode(ws.url, "pixels")
    stage.setup()
    old, scan.CHUNK_PIXELS = scan.CHUNK_PIXELS, 2_500_000
    try:
        out = list(stage.process(0))
    finally:
        scan.CHUNK_PIXELS = old
    chunks = [value for kind, value in out if kind == scan.CHUNK_OUT]
    assert [len(items) for items, _ in chunks] == [2, 2, 2]
    assert out[-1] == (scan.COMMITTED_OUT, 0)


def test_rerunning_a_scan_adds_nothing(workspace, hostile_dir):
    run_lida(workspace, "scan", str(hostile_dir), "--scan-id", "again")
    before = q(workspace, "select count(*) from {attributions} where scan_id = 'again'")
    run_lida(workspace, "scan", str(hostile_dir), "--scan-id", "again")
    assert q(workspace, "select count(*) from {attributions} where scan_id = 'again'") == before
    assert q(workspace, "select count(*), count(distinct uri) from {images} where scan_id = 'again'") == [(13, 13)]


@pytest.mark.slow
def test_embeddings_wait_beside_their_shard_and_an_earlier_runs_are_not_read(workspace, hostile_dir):
    """Issue #15: embeddings are staged per shard, not held by the join; stale staged files do not leak in.

    A file staged by an interrupted run under another model (vectors of all ones) sits beside
    where the shard's embeddings go. The scan must attribute exactly as a clean scan of the same
    files does, and leave nothing staged behind.
    """
    run_lida(workspace, "scan", str(hostile_dir), "--scan-id", "stage-clean")
    stale = Path(workspace) / "shards" / "stage-stale" / "000000.staged" / "v9999"
    stale.mkdir(parents=True)
    keys = np.asarray([f"000000_{i:05d}" for i in range(20)])
    np.savez(stale / "zz-interrupted.npz", keys=keys, embeddings=np.ones((len(keys), 256), np.float32))
    run_lida(workspace, "scan", str(hostile_dir), "--scan-id", "stage-stale")
    columns = "uri, predicted_source, is_generated, real_score, top1_similarity"
    clean = q(workspace, f"select {columns} from {{attributions}} where scan_id = 'stage-clean' order by uri")
    assert len(clean) == 8
    assert q(workspace, f"select {columns} from {{attributions}} where scan_id = 'stage-stale' order by uri") == clean
    assert not list((Path(workspace) / "shards").glob("*/*.staged"))


def test_each_shard_has_its_part_of_the_plan_and_a_plan_without_them_gets_them(workspace, hostile_dir, tmp_path):
    """Workers read their shard's own plan file; a plan written before those files existed (or a
    run stopped between the plan and them) has them written by the next run, equal to the plan."""
    from pipelines.scan import plan_scan, shard_plan_file

    ws = Workspace(workspace)
    plan = plan_scan(ws, "parts", [str(hostile_dir)], shard_size=3)
    assert len(plan["shards"]) >= 3
    for index, uris in enumerate(plan["shards"]):
        assert ws.read_json(shard_plan_file("parts", index)) == {"uris": uris}
        if index % 2 == 0:
            ws.fs.rm(ws.path(shard_plan_file("parts", index)))
    r = json_out(run_lida(workspace, "scan", str(hostile_dir), "--scan-id", "parts"))
    assert sum(r["status"].values()) == sum(len(u) for u in plan["shards"])
    assert ws.read_json("shards/parts/plan.json")["shards"] == plan["shards"]
    for index, uris in enumerate(plan["shards"]):
        assert ws.read_json(shard_plan_file("parts", index)) == {"uris": uris}
    rows = q(workspace, "select uri, shard from {images} where scan_id = 'parts'")
    assert sorted(rows) == sorted((u, f"{i:06d}") for i, uris in enumerate(plan["shards"]) for u in uris)


def test_repeats_across_shards_are_duplicates_and_attributed_once(workspace, hostile_dir, tmp_path):
    """Shards of 2: repeats land in other shards than their first copy, errors and all."""
    inbox = tmp_path / "repeats"
    inbox.mkdir()
    for name in ("good 0 é.png", "good 1 é.png", "page.jpg", "one.png"):
        for copy in range(3):
            shutil.copy(hostile_dir / name, inbox / f"{copy}_{name}")
    r = json_out(run_lida(workspace, "scan", str(inbox), "--scan-id", "repeats", env={"LIDA_SHARD_SIZE": "2"}))
    assert r["status"] == {"ok": 3, "duplicate": 6, "error": 3}
    assert len(list((Path(workspace) / "shards" / "repeats").glob("*.rows.parquet"))) == 6
    rows = q(workspace, "select uri, status from {images} where scan_id = 'repeats'")
    ok = sorted(u for u, s in rows if s == "ok")
    assert [Path(u).name for u in ok] == ["0_good 0 é.png", "0_good 1 é.png", "0_one.png"]  # the first URI keeps it
    attributed = q(workspace, "select uri, count(*) from {attributions} where scan_id = 'repeats' group by uri order by uri")
    assert attributed == [(u, 1) for u in ok]
    embedded = q(workspace, "select count(*), count(distinct image_id) from {embeddings} e "
                            "join (select image_id from {images} where scan_id = 'repeats' and status = 'ok') using (image_id)")
    assert embedded[0][1] == 3


@pytest.mark.slow
def test_kill_during_a_scan_then_rerun_is_exactly_once(workspace, sample_dirs, tmp_path):
    inbox = tmp_path / "inbox"
    for source in ("real", "shuffle_sr", "style_noise", "nearest_unet"):
        shutil.copytree(sample_dirs / "labelled" / source, inbox / source)
    env = {"LIDA_SHARD_SIZE": "4"}
    shards = Path(workspace) / "shards" / "crash"
    cmd = [LIDA, "--workspace", str(workspace), "scan", str(inbox), "--scan-id", "crash"]
    process = subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if len(list(shards.glob("*.rows.parquet"))) >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    subprocess.run(["pkill", "-9", "-f", "apache_beam.runners.worker.sdk_worker_main"], check=False)
    lock = Path(workspace) / "lock"
    assert process.returncode != 0, "the scan finished before it could be killed"
    run_lida(workspace, "scan", str(inbox), "--scan-id", "crash", env=env)
    counts = q(workspace, "select count(*), count(distinct uri) from {images} where scan_id = 'crash'")
    assert counts == [(24, 24)]
    attributed = q(workspace, "select count(*), count(distinct uri) from {attributions} where scan_id = 'crash'")
    assert attributed == [(24, 24)]
    run_lida(workspace, "scan", str(inbox), "--scan-id", "crash", env=env)  # a third run adds nothing
    assert q(workspace, "select count(*) from {attributions} where scan_id = 'crash'") == [(24,)]
    assert not lock.exists()


@pytest.mark.slow
def test_local_and_dask_runners_agree(workspace, sample_dirs):
    """Threads (the default on few cores), worker processes and Dask give the same attributions."""
    inbox = sample_dirs / "labelled"
    run_lida(workspace, "scan", str(inbox), "--scan-id", "on_local")
    run_lida(workspace, "--runner-option", "mode=multi_processing", "scan", str(inbox), "--scan-id", "on_processes")
    run_lida(workspace, "--runner", "dask", "scan", str(inbox), "--scan-id", "on_dask")
    for other in ("on_processes", "on_dask"):
        rows = q(workspace, """
            select count(*), count(*) filter (where a.predicted_source = b.predicted_source and a.topk_sources = b.topk_sources
                                              and abs(a.real_score - b.real_score) < 1e-5)
            from (select * from {attributions} where scan_id = 'on_local') a
            join (select * from {attributions} where scan_id = 'OTHER') b using (uri)""".replace("OTHER", other))
        assert rows == [(42, 42)], other


def test_index_publication_is_atomic_and_refuses_other_models(workspace):
    ws = Workspace(str(workspace))
    first = gallery_index.open_index(ws)
    seen, failures, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                idx = gallery_index.open_index(ws)
                assert idx.index.ntotal == idx.manifest["count"] == len(idx.sources)
                seen.add(idx.version)
            except Exception as exc:  # any failure to open is a broken publication
                failures.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(5):
            reindex(ws)
    finally:
        stop.set()
        thread.join()
    assert failures == [] and len(seen) >= 2
    current = gallery_index.open_index(ws)
    assert int(current.version[1:]) == int(first.version[1:]) + 5
    query = np.zeros((1, current.manifest["dimension"]), np.float32)
    with pytest.raises(gallery_index.IndexMismatch, match="run 'lida reindex'"):
        current.search(query, 3, "v9999")
    sims, ids = current.search(query + 1 / np.sqrt(query.shape[1]), 3, current.model_version)
    assert sims.shape == (1, 3) and (ids >= 0).all()


def test_query_reads_the_tables_as_views(workspace, hostile_dir, tmp_path):
    run_lida(workspace, "scan", str(hostile_dir), "--scan-id", "for_query")
    rows = json_out(run_lida(workspace, "query", "select status, count(*) as n from images where scan_id = 'for_query' "
                                                 "group by status order by status"))
    assert rows == [{"status": "duplicate", "n": 1}, {"status": "error", "n": 4}, {"status": "ok", "n": 8}]
    joined = json_out(run_lida(workspace, "query", "select count(*) as n from attributions a join images i using (scan_id, uri) "
                                                   "where scan_id = 'for_query' and i.status = 'ok'"))
    assert joined == [{"n": 8}]
    # A scan written before the images table had jpeg_quality: its rows read that column as null.
    import pyarrow.parquet as pq

    old = Path(workspace) / "tables" / "images" / "scan_id=before_quality"
    old.mkdir()
    pq.write_table(pq.read_table(next((Path(workspace) / "tables" / "images" / "scan_id=for_query").glob("*.parquet")))
                   .drop(["jpeg_quality"]), old / "part-00000.parquet")
    mixed = json_out(run_lida(workspace, "query", "select scan_id, count(jpeg_quality) as known, count(*) as n from images "
                                                  "where scan_id in ('for_query', 'before_quality') group by scan_id order by scan_id"))
    assert mixed == [{"scan_id": "before_quality", "known": 0, "n": 13}, {"scan_id": "for_query", "known": 1, "n": 13}]
    shutil.rmtree(old)
    bad = run_lida(workspace, "query", "select nope from images", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr
    fresh = tmp_path / "fresh"
    run_lida(fresh, "init", "--profile", "small")
    assert json_out(run_lida(fresh, "query", "select count(*) as n from attributions")) == [{"n": 0}]


def test_attribute_answers_per_file_in_order(workspace, sample_dirs, tmp_path):
    good = sorted((sample_dirs / "labelled" / "vae_ldm").glob("*.png"))[0]
    (tmp_path / "bad.jpg").write_bytes(b"<html>")
    result = run_lida(workspace, "attribute", str(good), str(tmp_path / "bad.jpg"), check=False)
    assert result.returncode == 3
    answers = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [Path(a["uri"]).name for a in answers] == [good.name, "bad.jpg"]
    first = answers[0]
    assert first["topk_sources"][0] == "vae_ldm" and first["top1_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert first["predicted_source"] in {"real", "unknown", "vae_ldm", "tconv_gan"} and first["model_version"].startswith("v")
    assert "not an image" in answers[1]["error"]


def test_jobs_run_as_beam_programs_with_beam_flags(workspace, sample_dirs):
    """`python -m pipelines.scan|gallery` take Beam's own flags, as Flink, Spark or Dataflow launches need."""
    import sys

    flags = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
    scan = subprocess.run([sys.executable, "-m", "pipelines.scan", "--workspace", str(workspace), "--input",
                           str(sample_dirs / "labelled" / "shuffle_sr"), "--scan-id", "from_argv", *flags],
                          capture_output=True, text=True, timeout=600)
    assert scan.returncode == 0, scan.stderr[-2000:]
    assert json.loads(scan.stdout.strip().splitlines()[-1])["status"] == {"ok": 6}
    assert q(workspace, "select count(*) from {attributions} where scan_id = 'from_argv'") == [(6,)]
    # a Beam flag without --runner reaches Beam too (it was dropped): an invalid one is Beam's to refuse
    dropped = subprocess.run([sys.executable, "-m", "pipelines.scan", "--workspace", str(workspace), "--input",
                              str(sample_dirs / "labelled" / "shuffle_sr"), "--scan-id", "flag_only",
                              "--direct_running_mode=nonsense"], capture_output=True, text=True, timeout=600)
    assert dropped.returncode != 0 and "nonsense" in dropped.stderr
    reindexed = subprocess.run([sys.executable, "-m", "pipelines.gallery", "--workspace", str(workspace), "--reindex"],
                               capture_output=True, text=True, timeout=600)
    assert reindexed.returncode == 0, reindexed.stderr[-2000:]
    assert json.loads(reindexed.stdout.strip().splitlines()[-1])["index_version"] == \
        Workspace(str(workspace)).read_bytes("indexes/CURRENT").decode().strip()


def test_query_keeps_scan_ids_as_text_and_runs_read_only(workspace, hostile_dir, tmp_path):
    """Issue #12 items 10 and 13."""
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(hostile_dir / "one.png", one / "one.png")
    run_lida(workspace, "scan", str(one), "--scan-id", "2026-11-27")
    found = json_out(run_lida(workspace, "query", "select scan_id, typeof(scan_id) t from images where scan_id like '2026%'"))
    assert found == [{"scan_id": "2026-11-27", "t": "VARCHAR"}]
    outside = tmp_path / "out.csv"
    for sql in (f"copy images to '{outside}'", f"attach '{tmp_path / 'x.duckdb'}'", "select * from read_csv('/etc/hostname')",
                "set enable_external_access = true", "create table t as select 1"):
        r = run_lida(workspace, "query", sql, check=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, sql
    assert not outside.exists()


@pytest.mark.slow  # 32 s: make test runs at the edge of its 15-minute budget
def test_bad_arguments_and_settings_are_refused_in_one_line(workspace, hostile_dir, tmp_path):
    """Issue #12 item 15: each used to escape as a traceback or be accepted."""
    one = str(hostile_dir / "one.png")
    for args in (("--runner-option", "workers=0", "scan", one), ("--runner-option", "workers=abc", "scan", one),
                 ("--runner-option", "mode=bogus", "scan", one), ("scan", one, "--scan-id", "x" * 300),
                 ("config", "k", "-5"), ("config", "top_k", "0"), ("config", "schedules.scan", "61 2 * * *"),
                 ("config", "schedules.scan", "not a cron")):
        r = run_lida(workspace, *args, check=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    config = json.loads((Path(workspace) / "config.json").read_text())
    assert config["k"] >= 1 and config["top_k"] >= 1 and config["schedules"]["scan"] == "0 2 * * *"
    r = run_lida(workspace, "attribute", one, str(tmp_path / "missing.png"), check=False)
    answers = [json.loads(line) for line in r.stdout.strip().splitlines()]
    answers = answers[0] if len(answers) == 1 and isinstance(answers[0], list) else answers
    assert [Path(a["uri"]).name for a in answers] == ["one.png", "missing.png"]
    assert "predicted_source" in answers[0] and "no such file" in answers[1]["error"]


def test_a_crafted_evaluation_file_cannot_inject_into_the_report(workspace, hostile_dir, tmp_path):
    """Issue #12 item 14: evals/*.json is read as untrusted."""
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(hostile_dir / "one.png", one / "one.png")
    run_lida(workspace, "scan", str(one), "--scan-id", "crafted")
    evals = Path(workspace) / "evals"
    evals.mkdir(exist_ok=True)
    (evals / "zzzz.json").write_text(json.dumps({"shots": "<script>alert(1)</script>", "directory": "<b>x</b>",
                                                 "model_version": "v0001", "rank1": "<i>", "mAP": 0.5,
                                                 "balanced_accuracy": None, "confusion": {"labels": ["<a>"], "matrix": [["x"]]}}))
    try:
        out = tmp_path / "r.html"
        run_lida(workspace, "report", "--scan-id", "crafted", "--output", str(out))
        page = out.read_text()
        assert "<script>" not in page and "&lt;script&gt;" in page and "<b>x</b>" not in page
    finally:
        (evals / "zzzz.json").unlink()


def test_embeddings_hold_one_row_per_image_and_model(workspace, hostile_dir):
    """Issue #12 item 11: the same images scanned under several ids are embedded once per model."""
    for scan_id in ("twice-a", "twice-a-b", "twice-a"):
        run_lida(workspace, "scan", str(hostile_dir), "--scan-id", scan_id)
    rows = q(workspace, "select count(*), count(distinct (image_id, model_version)) from {embeddings}")
    assert rows[0][0] == rows[0][1] > 0
    attributed = q(workspace, "select count(*) from {attributions} where scan_id in ('twice-a', 'twice-a-b')")
    assert attributed == [(16,)]  # every scan still attributes each of its 8 images


def test_webdataset_reads_every_shard_of_a_scan(workspace, hostile_dir):
    """Issue #14: the shards are WebDataset shards: each sample is the image and a .json with its lineage."""
    import webdataset as wds

    run_lida(workspace, "scan", str(hostile_dir), "--scan-id", "wds", env={"LIDA_SHARD_SIZE": "4"})
    shards = sorted(str(p) for p in (Path(workspace) / "shards" / "wds").glob("*.tar"))
    assert len(shards) >= 3
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    rows = {u: (i, k, s) for u, i, k, s in q(workspace, "select uri, image_id, key, status from {images} where scan_id = 'wds'")}
    seen = set()
    for sample in samples:
        meta = json.loads(sample["json"])
        image_ext = next(k for k in sample if k not in ("json", "__key__", "__url__", "__local_path__"))
        assert rows[meta["uri"]][:2] == (meta["image_id"], sample["__key__"]) and meta["scan_id"] == "wds"
        assert hashlib.sha256(sample[image_ext]).hexdigest() == meta["image_id"]  # the original bytes
        seen.add(meta["uri"])
    assert {u for u, (_, _, s) in rows.items() if s == "ok"} <= seen  # every decoded image is in a shard
    assert all(rows[u][2] in ("ok", "duplicate") for u in seen)  # a repeat across shards keeps its sample


def test_scan_shows_a_shard_bar_on_a_terminal_only(workspace, sample_dirs):
    """A progress bar of committed shards on stderr when it is a terminal; none when piped (or with --json)."""
    import fcntl
    import pty
    import termios

    folder = str(sample_dirs / "labelled" / "vae_ldm")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a width
    process = subprocess.Popen([LIDA, "--workspace", str(workspace), "scan", folder, "--scan-id", "bar-tty"],
                               stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    process.wait(timeout=600)
    os.close(master)
    assert process.returncode == 0
    assert b"shards:" in seen and b"/1 [" in seen  # tqdm's "shards: ...| n/1 [elapsed..." on the terminal
    plain = subprocess.run([LIDA, "--workspace", str(workspace), "scan", folder, "--scan-id", "bar-plain"],
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0 and "shards:" not in plain.stderr and "done" in plain.stderr


def test_a_runners_validation_errors_reach_the_user_whole(workspace, sample_dirs):
    """Dataflow without its GCP options: Beam lists what is missing after a colon; the one error line keeps the list."""
    r = run_lida(workspace, "--runner", "dataflow", "scan", str(sample_dirs / "labelled" / "real"), "--scan-id", "df", check=False)
    error = [line for line in r.stderr.splitlines() if line.startswith("lida: error:")]
    assert r.returncode == 1 and len(error) == 1, r.stderr
    assert "Pipeline has validations errors:" in error[0] and "Missing required option: project" in error[0], error


def _shard_stage(ws: Workspace, scan_id: str, shards: list[int]) -> None:
    """The scan's Shard transform alone, in Beam's TestPipeline, with assert_that on both of its outputs."""
    import apache_beam as beam
    import pyarrow.parquet as pq
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from lida_core.decode import decode_image
    from lida_core.inputs import read_input
    from pipelines.scan import Shard, shard_name

    def expected_keys():  # read when the pipeline checks, after the shards are committed
        return sorted(row["key"] for i in shards for row in pq.read_table(
            ws.path(f"shards/{scan_id}/{shard_name(i)}.rows.parquet")).to_pylist() if row["status"] == "ok")

    def pixels_match(chunks):
        plan = ws.read_json(f"shards/{scan_id}/plan.json")["shards"]
        for items, pixels in chunks:
            for item, array in zip(items, pixels, strict=True):
                uri = plan[int(item.shard)][int(item.key.rsplit("_", 1)[1])]
                np.testing.assert_array_equal(array, decode_image(read_input(uri), uri).pixels)
        keys = sorted(item.key for items, _ in chunks for item in items)
        assert keys == expected_keys() and keys, keys

    with TestPipeline(runner=FnApiRunner()) as p:
        committed, chunks = p | Shard(ws.url, scan_id, shards)
        assert_that(committed, equal_to(shards), label="EveryShardCommitted")
        assert_that(chunks | beam.combiners.ToList(), lambda got: pixels_match(got[0]), label="DecodedAsTheFilesAre")


def test_shard_stage_in_a_test_pipeline_writes_then_rereads_from_its_tars(workspace, hostile_dir):
    """Errors and duplicates stay out of the chunks; a committed shard is decoded again from its own tar."""
    from pipelines.scan import plan_scan

    ws = Workspace(str(workspace))
    plan = plan_scan(ws, "testpipeline", [str(hostile_dir)], shard_size=3)
    shards = list(range(len(plan["shards"])))
    assert len(shards) >= 3
    _shard_stage(ws, "testpipeline", shards)  # first run: reads the files, writes tars and rows
    tars = {p.name: p.stat().st_mtime_ns for p in (workspace / "shards" / "testpipeline").glob("*.tar")}
    assert len(tars) == len(shards)
    _shard_stage(ws, "testpipeline", shards)  # committed: the same chunks, read back from the tars
    assert {p.name: p.stat().st_mtime_ns for p in (workspace / "shards" / "testpipeline").glob("*.tar")} == tars


def _table_state(ws) -> tuple:
    """What readers see: every table's rows (uri, decision, scan) and how many Parquet files hold them."""
    attributions = q(ws, "select scan_id, uri, predicted_source, real_score from {attributions} order by all")
    embeddings = q(ws, "select image_id, model_version from {embeddings} order by all")
    return attributions, embeddings


def test_compact_merges_a_finished_scans_files_and_a_rerun_adds_nothing(workspace, sample_dirs):
    inbox = sample_dirs / "labelled"
    run_lida(workspace, "scan", str(inbox), "--scan-id", "compact_me")
    before = _table_state(workspace)
    part_dir = workspace / "tables" / "attributions" / "scan_id=compact_me"
    shards = sorted(p.name for p in part_dir.glob("part-*.parquet"))
    assert len(shards) >= 3
    r = json_out(run_lida(workspace, "compact", "--scan-id", "compact_me"))
    assert r["files_before"] >= len(shards) and r["files_after"] < r["files_before"], r
    assert sorted(p.name for p in part_dir.glob("*.parquet")) == ["part-c1.parquet"]
    journal = json.loads((part_dir / "_compaction.json").read_text())
    assert journal["state"] == "done" and len(journal["covered_shards"]) == len(shards)
    assert not list((workspace / "tables").glob(".compact/*"))  # staging gone
    assert _table_state(workspace) == before  # readers see the same rows, once each
    run_lida(workspace, "scan", str(inbox), "--scan-id", "compact_me")  # no shard is redone: none writes its part again
    assert sorted(p.name for p in part_dir.glob("*.parquet")) == ["part-c1.parquet"]
    assert _table_state(workspace) == before
    refused = run_lida(workspace, "compact", "--scan-id", "no_such_scan", check=False)
    assert refused.returncode == 2 and "no finished scan no_such_scan" in refused.stderr


@pytest.mark.slow
def test_a_compaction_killed_mid_swap_is_finished_by_the_next_run(workspace, sample_dirs):
    run_lida(workspace, "scan", str(sample_dirs / "labelled"), "--scan-id", "compact_kill")
    before = _table_state(workspace)
    for point in ("compact:staged", "compact:swapping"):
        killed = run_lida(workspace, "compact", "--scan-id", "compact_kill", check=False, env={"LIDA_FAIL_AT": point})
        assert killed.returncode == -9, killed.stderr
        if point == "compact:staged":  # died before its journal: nothing visible changed
            assert _table_state(workspace) == before
    run_lida(workspace, "scan", str(sample_dirs / "labelled"), "--scan-id", "compact_kill")  # finishes the swap first
    part_dir = workspace / "tables" / "attributions" / "scan_id=compact_kill"
    assert sorted(p.name for p in part_dir.glob("*.parquet")) == ["part-c1.parquet"]
    assert json.loads((part_dir / "_compaction.json").read_text())["state"] == "done"
    assert _table_state(workspace) == before
    again = json_out(run_lida(workspace, "compact"))
    assert _table_state(workspace) == before and again["recovered"] == 0

"""The installed `lida` command: help, and one-line errors with a non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import run_lida
from lida_core.model import PROFILES

LIDA = str(Path(sys.executable).with_name("lida"))


def run(*args, env=None):
    return subprocess.run([LIDA, *args], capture_output=True, text=True, timeout=120, env=env)


def test_help_lists_every_contract_verb():
    result = run("--help")
    assert result.returncode == 0
    for verb in ("init", "pretrain", "gallery", "adapt", "reindex", "scan", "attribute", "eval", "report", "query", "serve", "demo"):
        assert verb in result.stdout


def test_bad_arguments_give_one_line_and_touch_nothing(tmp_path):
    """0 epochs used to fall back to the default silently, and a negative count to train nothing.

    (Pre-training takes 0 epochs on purpose: it then only calibrates.)"""
    ws = str(tmp_path / "ws")
    for args, expected in ((("adapt", "--epochs", "0"), "--epochs: must be at least 1, got 0"),
                           (("pretrain", str(tmp_path), "--epochs", "-1"), "--epochs: must be 0 or more, got -1"),
                           (("pretrain", str(tmp_path), "--batch-size", "-4"), "--batch-size: must be at least 1"),
                           (("adapt", "--lr", "nan"), "--lr: must be a positive number"),
                           (("eval", str(tmp_path), "--shots", "five"), "--shots: expected a whole number"),
                           (("nosuchverb",), "invalid choice")):
        result = run("--workspace", ws, *args)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and expected in result.stderr and "--help" in result.stderr, result.stderr
    # profile names come from the registry, not from a list in the command
    unknown = run("--workspace", ws, "init", "--profile", "bogus")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert f"unknown model profile 'bogus'; known: {', '.join(sorted(PROFILES))}" in unknown.stderr
    assert not Path(ws).exists()


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = run("demo", "--dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("lida: error:") and "not a lida demo folder" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    as_json = run("--json", "demo", "--dir", str(tmp_path))
    assert as_json.returncode == 2 and "error" in json.loads(as_json.stdout)


def test_config_shows_sets_and_checks(tmp_path):
    ws = str(tmp_path / "ws")
    assert run("--workspace", ws, "config").returncode == 2  # no workspace yet: one line
    assert run("--workspace", ws, "init", "--profile", "small").returncode == 0
    assert run("--workspace", ws, "config", "inboxes", "/data/a", "s3://bucket/b").returncode == 0
    assert json.loads(run("--workspace", ws, "--json", "config", "inboxes").stdout) == {"inboxes": ["/data/a", "s3://bucket/b"]}
    assert run("--workspace", ws, "config", "schedules.scan", "15 1 * * *").returncode == 0
    assert json.loads(run("--workspace", ws, "--json", "config").stdout)["schedules"]["scan"] == "15 1 * * *"
    assert run("--workspace", ws, "config", "adapt_min_new", "5").returncode == 0
    for bad, reason in ((("target_fpr", "2"), "must lie in (0, 1)"), (("adapt_min_new", "many"), "is not an integer"),
                        (("fingerprint", "b3-binary-full"), "fixed when the workspace is made"),
                        (("nonsense", "1"), "no setting 'nonsense'")):
        result = run("--workspace", ws, "config", *bad)
        assert result.returncode == 2 and reason in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert json.loads(run("--workspace", ws, "--json", "config", "target_fpr").stdout) == {"target_fpr": 0.05}
    assert run("--workspace", ws, "config", "detection", "contrast").returncode == 0  # optional: none = the profile's rule
    assert json.loads(run("--workspace", ws, "--json", "config", "detection").stdout) == {"detection": "contrast"}
    assert run("--workspace", ws, "config", "detection", "none").returncode == 0
    assert json.loads(run("--workspace", ws, "--json", "config", "detection").stdout) == {"detection": None}
    bad = run("--workspace", ws, "config", "detection", "vibes")
    assert bad.returncode == 2 and "detection must be" in bad.stderr


def test_module_entry_point_and_workspace_env():
    env = dict(os.environ, LIDA_WORKSPACE="/tmp/elsewhere")
    result = subprocess.run([sys.executable, "-m", "lida_core", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "/tmp/elsewhere" not in result.stderr
    bad = run("--device", "tpu", "scan")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_cpu_default_profile_is_srm_and_refuses_the_rgb_ablation(tmp_path, sample_dirs):
    ws = str(tmp_path / "ws")
    made = run("--workspace", ws, "--json", "init")
    assert made.returncode == 0 and json.loads(made.stdout)["profile"] == "srm"
    rgb = run("--workspace", ws, "pretrain", str(sample_dirs / "pretrain"), "--input", "rgb", "--epochs", "1")
    assert rgb.returncode == 2 and "reads low-bit fingerprints" in rgb.stderr and rgb.stderr.count("\n") == 1


def test_a_job_that_cannot_run_says_why_in_one_line_before_any_work(tmp_path, sample_dirs):
    """Issue #12 item 5: preconditions are checked in the driver (exit 2, one line, no shard written)."""
    ws = tmp_path / "ws"
    run_lida(ws, "init", "--profile", "small")
    run_lida(ws, "gallery", "add", "--source", "real", str(sample_dirs / "labelled" / "real"))
    r = run_lida(ws, "scan", str(sample_dirs / "labelled" / "real"), "--scan-id", "early", check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["lida: error: the current model has no real prototype yet: "
                                             "run 'lida pretrain' or 'lida adapt' first"]
    assert not (ws / "shards" / "early").exists()


def test_an_error_raised_in_a_beam_worker_is_reported_as_the_worker_raised_it():
    from lida_cli.cli import worker_error

    wrapped = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
                           "lida_core.index.IndexMismatch: the published index is for model v0002, not v0003; "
                           "run 'lida reindex' [while running 'EmbedAttribute/Attribute']")
    assert worker_error(wrapped) == ("IndexMismatch", "the published index is for model v0002, not v0003; run 'lida reindex'")
    assert worker_error(MemoryError()) == ("MemoryError", "")


def test_global_options_work_after_the_verb_and_have_help(tmp_path, sample_dirs):
    """Issue #14: `lida query SQL --json` and `lida gallery list --workspace W` as users type them."""
    ws = tmp_path / "ws"
    run_lida(ws, "init", "--profile", "small")
    after = run("gallery", "list", "--workspace", str(ws), "--json")
    assert after.returncode == 0 and json.loads(after.stdout)["model_version"] == "v0000"
    query = run("query", "select 1 as one", "--workspace", str(ws), "--json")
    assert query.returncode == 0 and json.loads(query.stdout) == [{"one": 1}]
    help_text = " ".join(run("scan", "--help").stdout.split())
    for text in ("where embeddings are computed", "where Beam jobs run", "workers=N", "dask_address=HOST:PORT"):
        assert text in help_text


def test_listing_the_gallery_loads_neither_beam_nor_torch(tmp_path):
    """`lida gallery list` reads two small files: it must not pay Beam's and torch's 3-4 s of imports (only `add` runs a job)."""
    ws = tmp_path / "ws"
    run_lida(ws, "init", "--profile", "small")
    probe = ("import sys; from lida_cli.cli import main; code = main(['gallery', 'list', '--workspace', sys.argv[1]]); "
             "print(code, sorted(m for m in ('apache_beam', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe, str(ws)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 []"
    assert "model v0000" in r.stdout

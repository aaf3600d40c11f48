"""The installed `lida` command: help, and one-line errors with a non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

LIDA = str(Path(sys.executable).with_name("lida"))


def run(*args, env=None):
    return subprocess.run([LIDA, *args], capture_output=True, text=True, timeout=120, env=env)


def test_help_lists_every_contract_verb():
    result = run("--help")
    assert result.returncode == 0
    for verb in ("init", "pretrain", "gallery", "adapt", "reindex", "scan", "attribute", "eval", "report", "query", "serve", "demo"):
        assert verb in result.stdout


def test_unfinished_verbs_fail_in_one_line_never_fake_success():
    result = run("demo")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("lida: error:")
    as_json = run("--json", "demo")
    assert as_json.returncode == 2 and "error" in json.loads(as_json.stdout)


def test_module_entry_point_and_workspace_env():
    env = dict(os.environ, LIDA_WORKSPACE="/tmp/elsewhere")
    result = subprocess.run([sys.executable, "-m", "lida_core", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "/tmp/elsewhere" not in result.stderr
    bad = run("--device", "tpu", "scan")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr

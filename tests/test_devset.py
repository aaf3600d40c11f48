"""Real generators (`../shared/devset`, or LIDA_DEVSET): one 5-shot PNG evaluation through the command.

Development data, not shipped: the test is skipped with its reason where the folder is absent.
The full table (1/5/10 shots, 5 seeds, PNG and JPEG 90, the RGB ablation) is
`benchmarks/eval_devset.py`; docs/results.md has its figures.
"""

import os
from pathlib import Path

import pytest

from conftest import json_out, run_lida

DEVSET = Path(os.environ.get("LIDA_DEVSET", Path(__file__).resolve().parents[1].parent / "shared" / "devset"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEVSET / "png" / "real").is_dir() or not (DEVSET / "pretrain" / "real").is_dir(),
                       reason=f"no devset at {DEVSET} (set LIDA_DEVSET to its folder to run this test)"),
]


def test_default_profile_attributes_real_generators(tmp_path):
    ws = tmp_path / "ws"
    assert json_out(run_lida(ws, "init"))["profile"] == "srm"
    run_lida(ws, "pretrain", str(DEVSET / "pretrain" / "real"))
    r = json_out(run_lida(ws, "eval", str(DEVSET / "png"), "--shots", "5", "--seed", "0"))
    # Six sources (real among them): chance attribution is about 1/6. Issue #11 asks for 0.7 here.
    # The closed-form fit is deterministic: since session 19 (residuals truncated at 3) this seed
    # reaches 0.829 (0.726 in sessions 17-18, 0.722 in session 16, 0.714 in sessions 14-15, 0.684
    # before; docs/results.md), so the test asks what the issue asks.
    assert r["attribution_accuracy"] >= 0.7, {k: r[k] for k in ("attribution_accuracy", "rank1", "balanced_accuracy")}
    assert r["rank1"] >= 0.8 and r["false_positive_rate"] <= 0.08, r
    assert r["detection"] == "quadratic" and r["query_images"] == 264 - 30

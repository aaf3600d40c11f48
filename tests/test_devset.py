"""Real generators (`../shared/devset`, or LIDA_DEVSET): one 5-shot PNG evaluation through the command.

Development data, not shipped: the test is skipped with its reason where the folder is absent.
The full table (1/5/10 shots, 5 seeds, PNG and JPEG 90, the RGB ablation) is
`benchmarks/eval_devset.py`; docs/results.md has its figures.
"""

import os
from pathlib import Path

import pytest

from conftest import json_out, run_lida
from lida_core.lifecycle import load_model
from lida_core.workspace import Workspace

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
    # Six sources (real among them): chance attribution is about 1/6. Issue #11 asks for 0.7 here,
    # and 0.80 on average over draws. The closed-form fit is deterministic: since session 28 (the
    # flat and gentle pixels' triples) this seed reaches 0.859 (0.829 in sessions 19-27, 0.726 in
    # sessions 17-18, 0.714 in sessions 14-15, 0.684 before; docs/results.md), so the test asks 0.8.
    assert r["attribution_accuracy"] >= 0.8, {k: r[k] for k in ("attribution_accuracy", "rank1", "balanced_accuracy")}
    # One draw's false-positive rate swings with the draw (5.6-8.2% on average over draws, 0-24% per
    # draw; docs/results.md, session 28): this one flags 7 of its 55 real photographs (2 in sessions
    # 19-27). The bound catches a threshold gone wrong, not the 5% target, which is a mean.
    assert r["rank1"] >= 0.8 and r["false_positive_rate"] <= 0.15, r
    assert r["detection"] == "quadratic" and r["query_images"] == 264 - 30


def test_a_gallery_that_grows_gets_a_refit_that_names_the_new_generators(tmp_path):
    """Generators registered after a fit: their refit is promoted, and the gate judges the current model out of sample.

    Before session 21 the current model was judged on held-out gallery images it had been fitted
    on (in-sample: 0.767 against the refit's 0.733 on these images), the stale model stayed, and
    it called every image of the new generators real.
    """
    ws = tmp_path / "ws"
    run_lida(ws, "init")
    run_lida(ws, "pretrain", str(DEVSET / "pretrain" / "real"))
    first, added = ["real", "stable_diffusion_v1", "stylegan2_ffhq", "stylegan2_pizza"], ["dalle2", "dit_xl2"]

    def register(source, start):
        shots = tmp_path / "shots" / f"{source}-{start}"
        shots.mkdir(parents=True)
        for f in sorted((DEVSET / "png" / source).iterdir())[start : start + 5]:
            (shots / f.name).write_bytes(f.read_bytes())
        run_lida(ws, "gallery", "add", "--source", source, str(shots))

    for source in first:
        register(source, 0)
    assert json_out(run_lida(ws, "adapt"))["promoted"]  # the first gallery fit of a pre-trained model
    assert len(load_model(Workspace(str(ws))).meta["data"]["images"]) == 20  # what the next gate leaves out
    for source in added:
        register(source, 0)
    grown = json_out(run_lida(ws, "adapt"))
    meta = load_model(Workspace(str(ws))).meta
    assert grown["promoted"] and meta["promotion"]["rule"].endswith("not fitted on: dalle2, dit_xl2"), meta["promotion"]
    assert len(meta["decider"]["quadratic"]["generator_means"]) == 5  # the detector has a side for every generator
    # Unchanged gallery: the current model's figure is its own fit repeated without each fold, the
    # candidate's procedure exactly, so the two agree (judged as it stood, in-sample, it scored higher).
    again = json_out(run_lida(ws, "adapt"))
    assert again["holdout_accuracy_before"] == again["holdout_accuracy_after"], again
    # More images of known generators: the ordinary gate, with both figures out of sample.
    for source in added:
        register(source, 5)
    more = json_out(run_lida(ws, "adapt"))
    rule = Workspace(str(ws)).model_meta(more["model_version"])["promotion"]["rule"]  # the candidate, promoted or not
    assert rule == "candidate leave-out accuracy >= current, both out of sample", rule
    assert more["promoted"] == (more["holdout_accuracy_after"] >= more["holdout_accuracy_before"]), more


"""Report histograms put their axis where the values are (the quadratic rule's scores are not in [-1, 1])."""

import re

import numpy as np

from lida_core.report import histogram


def _bars(svg: str) -> int:
    return len(re.findall(r"<rect ", svg))


def test_histogram_axis_spans_the_values_and_thresholds():
    scores = 2.0 + np.abs(np.random.default_rng(0).normal(20.0, 8.0, size=200))
    svg = histogram("real score", [], {"real threshold": 17.2}, groups={"real": scores[:100], "sd": scores[100:]})
    assert _bars(svg) > 10  # on a fixed [-1, 1] axis every value would sit in one clipped bar
    assert _bars(histogram("real score", [], {}, lo=-1.0, hi=1.0, groups={"all": scores})) == 1
    similarities = 0.9990 + np.random.default_rng(1).random(50) * 0.0008
    assert _bars(histogram("top-1 similarity", list(similarities), {"unknown threshold": None})) > 5
    assert "<rect" not in histogram("empty", [], {"t": None})

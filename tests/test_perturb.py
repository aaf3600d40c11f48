"""Perturbations for the robustness runs: parsing, and what each does to decoded pixels."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lida_core.perturb import Perturbation, parse_perturbations


def test_specs_expand_to_one_perturbation_per_value_in_order():
    got = parse_perturbations(["jpeg:95,90,85", "blur:1", "jpeg:90"])
    assert [str(p) for p in got] == ["jpeg:95", "jpeg:90", "jpeg:85", "blur:1"]  # a repeat is run once
    assert [p.makes_jpeg for p in got] == [True, True, True, False]


@pytest.mark.parametrize("spec, message", [("jpeg", "expected KIND:V"), ("noise:3", "expected KIND:V"),
                                           ("jpeg:9x", "not a number"), ("jpeg:90.5", "whole number"),
                                           ("jpeg:100", "from 1 to 95"), ("blur:0", "above 0"), ("blur:11", "at most 10")])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_perturbations([spec])


def test_jpeg_is_a_pillow_round_trip_and_blur_is_pillows_gaussian(rng):
    x = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=85)
    np.testing.assert_array_equal(Perturbation("jpeg", 85).apply(x), np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    blurred = Perturbation("blur", 1.0).apply(x)
    np.testing.assert_array_equal(blurred, np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.0))))
    assert blurred.shape == x.shape and blurred.std() < x.std() / 2  # noise is smoothed away

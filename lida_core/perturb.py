"""Perturbations of decoded images, for the paper's robustness runs and for JPEG-aware fits.

`lida eval --perturb jpeg:95,90,85 --perturb blur:1` re-scores the same queries after each
perturbation (the paper's robustness protocol: JPEG at quality 95, 90 and 85, and Gaussian
blur). Each is applied to the decoded pixels in memory:

- `jpeg:Q`  written by Pillow at quality Q (1-95) and read back by `decode_image`, as every file is
  (in the model's JPEG colour space: `FingerprintSettings.jpeg`);
- `blur:S`  Pillow's Gaussian blur with standard deviation S pixels (0 < S <= 10).

Both start from RGB: a JPEG decoded to its YCbCr (`decode.YCbCrPixels`) is converted first.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from lida_core.decode import decode_image, ycc_to_rgb

KINDS = {"jpeg": (1, 95), "blur": (0, 10)}  # accepted value ranges (blur's lower bound is exclusive)


def jpeg_copy(pixels: np.ndarray, quality: int, jpeg_space: str = "rgb") -> np.ndarray:
    """The image as Pillow writes it at this JPEG quality, read back by lida's one decoder (in `jpeg_space`)."""
    buffer = io.BytesIO()
    Image.fromarray(ycc_to_rgb(pixels)).save(buffer, "JPEG", quality=int(quality))
    return decode_image(buffer.getvalue(), f"JPEG copy at quality {quality}", jpeg_space=jpeg_space).pixels


@dataclass(frozen=True)
class Perturbation:
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"

    @property
    def makes_jpeg(self) -> bool:
        """Whether the perturbed image is a JPEG (its decision then uses the JPEG threshold)."""
        return self.kind == "jpeg"

    def apply(self, pixels: np.ndarray, jpeg_space: str = "rgb") -> np.ndarray:
        """The perturbed image; a JPEG result is read back in `jpeg_space` (the model's), a blurred one is RGB."""
        if self.kind == "jpeg":
            return jpeg_copy(pixels, int(self.value), jpeg_space)
        blurred = Image.fromarray(ycc_to_rgb(pixels)).filter(ImageFilter.GaussianBlur(radius=float(self.value)))
        return np.asarray(blurred)


def parse_perturbations(specs: Sequence[str]) -> list[Perturbation]:
    """['jpeg:95,90,85', 'blur:1'] -> one Perturbation per value, in order; ValueError says what is wrong."""
    out: list[Perturbation] = []
    for spec in specs:
        kind, _, values = spec.partition(":")
        if kind not in KINDS or not values:
            raise ValueError(f"--perturb {spec!r}: expected KIND:V[,V...] with KIND one of {', '.join(KINDS)}")
        low, high = KINDS[kind]
        for text in values.split(","):
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"--perturb {spec!r}: {text!r} is not a number") from None
            if kind == "jpeg" and (value != int(value) or not low <= value <= high):
                raise ValueError(f"--perturb {spec!r}: JPEG quality must be a whole number from {low} to {high}")
            if kind == "blur" and not low < value <= high:
                raise ValueError(f"--perturb {spec!r}: blur sigma must be above {low} and at most {high} pixels")
            p = Perturbation(kind, value)
            if p not in out:
                out.append(p)
    return out

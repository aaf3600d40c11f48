"""Bundled sample data: real photographs and seeded synthetic "generators".

Real images are crops of the colour photographs shipped inside scikit-image's wheel
(nothing is downloaded). Generated images re-synthesise real crops the way latent
generators do: encode to a half-resolution latent, then decode with a generator-specific
decoder whose weights are fixed by a seed. Every decoder starts near bilinear
interpolation plus a seeded perturbation, so its output still looks like its input, while
its up-sampling mechanism (transposed convolution, nearest + conv, bilinear + conv, pixel
shuffle, a VAE-like residual decoder, noise injection) leaves its own trace. The decoder also
turns seeded latent noise into fine texture, so generated images are not simply blurrier
than real ones; the texture carries the decoder's trace into the low bits.

Image number i of every source, real included, shows the same crop of the same photograph,
so content cannot tell the sources apart; only the synthesis trace can.
Everything is deterministic given (source, index, seed) and saved losslessly (PNG).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REAL = "real"
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)
SIZES = (128, 160, 192, 224, 256)
ACTIVATION_DOSE = 0.05
TEXTURE_KERNEL = 5
ACTIVATIONS = {"leaky_relu": lambda v: F.leaky_relu(v, 0.2), "silu": F.silu, "gelu": F.gelu, "softplus": F.softplus}
LATENT_CHANNELS = 6
DETAIL_STEP = 8  # 2**3: detail never reaches the three lowest bit planes


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


_photo_cache: dict[str, np.ndarray] = {}


def photo(name: str) -> np.ndarray:
    """One bundled photograph, H x W x 3 uint8."""
    if name not in _photo_cache:
        import skimage.data as data  # heavy import, only when samples are made

        if name.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            image = left if name.endswith("left") else right
        else:
            image = getattr(data, name)()
        _photo_cache[name] = np.ascontiguousarray(image[..., :3].astype(np.uint8))
    return _photo_cache[name]


def real_crop(index: int, seed: int = 0, stream: str = "content") -> np.ndarray:
    """A crop of a bundled photograph; sizes, positions and turns drawn from the seed."""
    rng = np.random.default_rng(_seed(stream, index, seed))
    image = photo(PHOTOS[int(rng.integers(len(PHOTOS)))])
    size = int(rng.choice(SIZES))
    height, width = image.shape[:2]
    size = min(size, height, width)
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    crop = image[top : top + size, left : left + size]
    # Flips and quarter turns move pixels without changing any value.
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.integers(2):
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


# ---------------------------------------------------------------- decoders


def _bilinear_kernel(factor: int) -> torch.Tensor:
    """The 2f x 2f kernel that makes a stride-f transposed convolution bilinear."""
    size = 2 * factor
    center = factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    k = 1 - (og - center).abs() / factor
    return (k[:, None] * k[None, :]).float()


class _Upsampler(nn.Module):
    """x2 up-sampling of C channels by one of several mechanisms, near-bilinear at start."""

    def __init__(self, kind: str, channels: int, gen: torch.Generator, jitter: float):
        super().__init__()
        self.kind = kind
        c = channels
        eye = torch.eye(c)
        if kind == "tconv":
            self.conv = nn.ConvTranspose2d(c, c, 4, stride=2, padding=1, bias=False)
            weight = eye[:, :, None, None] * _bilinear_kernel(2)[None, None]
            weight = weight + eye[:, :, None, None] * jitter * torch.randn(weight.shape, generator=gen)
            # Each output phase reads every other tap; keep each phase's gain at 1.
            for py in (0, 1):
                for px in (0, 1):
                    phase = weight[:, :, py::2, px::2]
                    weight[:, :, py::2, px::2] = phase / phase.sum((0, 2, 3), keepdim=True)
            self.conv.weight.data = weight
        elif kind in ("nearest_conv", "bilinear_conv", "vae", "noise_inject"):
            self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            if kind == "nearest_conv":
                # nearest x2 followed by this kernel approximates bilinear interpolation
                base = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
            else:
                base = torch.zeros(3, 3)
                base[1, 1] = 1.0
            weight = eye[:, :, None, None] * (base[None, None] + jitter * torch.randn(c, 1, 3, 3, generator=gen))
            self.conv.weight.data = weight / weight.sum((1, 2, 3), keepdim=True)
        elif kind == "pixel_shuffle":
            # Each of the 4 sub-pixels starts as the bilinear weighting of its 3x3 neighbours.
            self.conv = nn.Conv2d(c, 4 * c, 3, padding=1, bias=False)
            taps = {0: (0.25, 0.75, 0.0), 1: (0.0, 0.75, 0.25)}
            weight = torch.zeros(4 * c, c, 3, 3)
            for ch in range(c):
                for dy in (0, 1):
                    for dx in (0, 1):
                        k = torch.tensor(taps[dy])[:, None] * torch.tensor(taps[dx])[None, :]
                        k = k + jitter * torch.randn(3, 3, generator=gen)
                        weight[ch * 4 + dy * 2 + dx, ch] = k / k.sum()
            self.conv.weight.data = weight
        else:
            raise ValueError(f"unknown up-sampler {kind!r}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "tconv":
            return self.conv(z)
        if self.kind == "pixel_shuffle":
            return F.pixel_shuffle(self.conv(z), 2)
        mode = "nearest" if self.kind == "nearest_conv" else "bilinear"
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        return self.conv(F.interpolate(z, scale_factor=2, mode=mode, **kwargs))


@dataclass(frozen=True)
class GeneratorSpec:
    name: str
    upsampler: str  # mechanism of each x2 stage
    activation: str
    factor: int  # latent down-sampling: 2, 4 or 8 (log2(factor) x2 stages)
    jitter: float  # perturbation of the interpolating kernels
    phase_gain: float  # gain error per output phase of each stage: the periodic grid of real decoders
    phase_bias: float  # offset per output phase of each stage, in grey levels (bias after up-sampling)
    texture: float  # decoded noise, in grey levels
    residual: bool = False  # VAE-like residual block with normalisation after up-sampling


GENERATORS: dict[str, GeneratorSpec] = {
    spec.name: spec
    for spec in (
        GeneratorSpec("tconv_gan", "tconv", "leaky_relu", 4, 0.03, 0.01, 3.5, 0.6),
        GeneratorSpec("nearest_unet", "nearest_conv", "silu", 2, 0.03, 0.01, 3.5, 0.4),
        GeneratorSpec("bilinear_diffusion", "bilinear_conv", "gelu", 8, 0.03, 0.01, 3.0, 0.3),
        GeneratorSpec("shuffle_sr", "pixel_shuffle", "softplus", 2, 0.03, 0.01, 4.0, 1.0),
        GeneratorSpec("vae_ldm", "vae", "silu", 8, 0.03, 0.01, 3.5, 0.5, residual=True),
        GeneratorSpec("style_noise", "noise_inject", "leaky_relu", 4, 0.03, 0.01, 3.0, 1.5),
    )
}


class SyntheticGenerator(nn.Module):
    """Encode (2x2 average, seeded 3 -> C mix) then decode (up-sampler, activation, C -> 3)."""

    def __init__(self, spec: GeneratorSpec, seed: int = 0):
        super().__init__()
        self.spec = spec
        gen = torch.Generator().manual_seed(_seed("generator", spec.name, seed) % (2**63))
        c = LATENT_CHANNELS
        mix = torch.randn(c, 3, generator=gen)
        self.encode_mix = nn.Parameter(mix, requires_grad=False)
        head = torch.linalg.pinv(mix)  # 3 x C: the decoder starts as the encoder's inverse
        self.head = nn.Parameter(head + 0.002 * torch.randn(head.shape, generator=gen), requires_grad=False)
        self.bias = nn.Parameter(0.5 * torch.randn(c, generator=gen), requires_grad=False)
        stages = int(math.log2(spec.factor))
        if 2**stages != spec.factor or stages < 1:
            raise ValueError(f"{spec.name}: factor must be 2, 4 or 8")
        self.up = nn.ModuleList(_Upsampler(spec.upsampler, c, gen, spec.jitter) for _ in range(stages))
        gains = 1.0 + spec.phase_gain * torch.randn(stages, 1, c, 2, 2, generator=gen)
        self.phase_gains = nn.Parameter(gains, requires_grad=False)
        biases = spec.phase_bias / 255.0 * torch.randn(stages, 1, c, 2, 2, generator=gen)
        self.phase_biases = nn.Parameter(biases, requires_grad=False)
        if spec.residual:
            self.res1 = nn.Conv2d(c, c, 3, padding=1)
            self.res2 = nn.Conv2d(c, c, 3, padding=1)
            for conv in (self.res1, self.res2):
                conv.weight.data = 0.15 * torch.randn(conv.weight.shape, generator=gen)
                conv.bias.data = 0.05 * torch.randn(conv.bias.shape, generator=gen)
            self.norm = nn.GroupNorm(2, c, affine=False)
        if spec.upsampler == "noise_inject":
            self.noise_scale = nn.Parameter(torch.rand(c, generator=gen) + 0.5, requires_grad=False)
        # The decoder's own fine texture: noise shaped by a seeded kernel, with seeded colour
        # correlation; its spectrum is the generator's signature in the low bits.
        kernel = torch.randn(3, 1, TEXTURE_KERNEL, TEXTURE_KERNEL, generator=gen)
        self.texture_kernel = nn.Parameter(kernel / kernel.pow(2).sum((1, 2, 3), keepdim=True).sqrt(), requires_grad=False)
        colour = torch.eye(3) + 0.5 * torch.randn(3, 3, generator=gen)
        self.texture_colour = nn.Parameter(colour / colour.pow(2).sum(1, keepdim=True).sqrt(), requires_grad=False)
        self.requires_grad_(False)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        # A weak dose of the activation's curvature (around a seeded operating point, divided by
        # its slope there): near-identity on content, a generator-specific tone on detail.
        fn = ACTIVATIONS[self.spec.activation]
        shift = 0.25 + self.bias.abs().view(1, -1, 1, 1)  # where every activation rises
        eps = 1e-3
        slope = ((fn(shift + eps) - fn(shift - eps)) / (2 * eps)).clamp_min(0.2)
        return (fn(shift + ACTIVATION_DOSE * h) - fn(shift)) / (ACTIVATION_DOSE * slope)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, noise_seed: int) -> torch.Tensor:
        """image: N x 3 x H x W float in [0, 1] (H, W multiples of the factor) -> N x 3 x H x W grey levels 0..255 (uint8 values)."""
        f = self.spec.factor
        pooled = F.avg_pool2d(image, f)
        z = torch.einsum("ck,nkhw->nchw", self.encode_mix, pooled)
        gen = torch.Generator().manual_seed(noise_seed % (2**63))
        scale = self.spec.texture / 255.0
        h = z + scale * torch.randn(z.shape, generator=gen)
        for stage, up in enumerate(self.up):
            h = up(h)
            tiles = (1, 1, h.shape[2] // 2, h.shape[3] // 2)
            h = h * self.phase_gains[stage].repeat(tiles) + self.phase_biases[stage].repeat(tiles)
        if self.spec.upsampler == "noise_inject":
            pixel_noise = torch.randn(h.shape[0], 1, *h.shape[2:], generator=gen)
            h = h + scale * self.noise_scale.view(1, -1, 1, 1) * pixel_noise
        h = self._activation(h)
        if self.spec.residual:
            h = h + 0.02 * self.res2(F.silu(self.norm(self.res1(h))))
        decoded = torch.einsum("kc,nchw->nkhw", self.head, h)
        white = torch.randn(decoded.shape, generator=gen)
        shaped = F.conv2d(white, self.texture_kernel, padding=TEXTURE_KERNEL // 2, groups=3)
        decoded = decoded + scale * torch.einsum("kc,nchw->nkhw", self.texture_colour, shaped)
        # The latent keeps content only to 1/factor resolution; like a trained decoder, restore
        # the content's detail: each pixel is the value nearest the content whose lowest bit
        # planes are the decoder's own output, so nothing of the photograph's noise survives there.
        levels = torch.round(decoded.clamp(0, 1) * 255.0)
        target = image * 255.0
        out = levels + DETAIL_STEP * torch.round((target - levels) / DETAIL_STEP)
        # Near black or white, step back inside the range rather than clip (clipping rewrites bits).
        out = torch.where(out > 255, out - DETAIL_STEP, out)
        return torch.where(out < 0, out + DETAIL_STEP, out)


_generator_cache: dict[tuple[str, int], SyntheticGenerator] = {}


def generator(name: str, seed: int = 0) -> SyntheticGenerator:
    if name not in GENERATORS:
        raise ValueError(f"unknown sample generator {name!r}; known: {', '.join(GENERATORS)}")
    key = (name, seed)
    if key not in _generator_cache:
        _generator_cache[key] = SyntheticGenerator(GENERATORS[name], seed)
    return _generator_cache[key]


def to_uint8(levels: torch.Tensor) -> np.ndarray:
    """Grey levels N x 3 x H x W (already whole numbers in 0..255) -> N x H x W x 3 uint8."""
    return levels.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_image(source: str, index: int, seed: int = 0) -> np.ndarray:
    """The `index`-th image of `source` ('real' or a generator name), H x W x 3 uint8."""
    # Image `index` of every source shows the same crop: content says nothing about the source.
    crop = real_crop(index, seed)
    if source == REAL:
        return crop
    f = GENERATORS[source].factor if source in GENERATORS else 1
    crop = crop[: crop.shape[0] // f * f, : crop.shape[1] // f * f]
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0
    return to_uint8(generator(source, seed)(x, _seed("noise", source, index, seed)))[0]


def sample_sources() -> list[str]:
    return [REAL, *GENERATORS]


def iter_samples(per_source: int, sources: list[str] | None = None, seed: int = 0, start: int = 0) -> Iterator[tuple[str, int, np.ndarray]]:
    for source in sources or sample_sources():
        for index in range(start, start + per_source):
            yield source, index, sample_image(source, index, seed)


def write_samples(directory: str, per_source: int, sources: list[str] | None = None, seed: int = 0, start: int = 0) -> list[str]:
    """Write `directory/<source>/<source>_<index>.png` losslessly; returns the paths."""
    from PIL import Image

    paths = []
    for source, index, pixels in iter_samples(per_source, sources, seed, start):
        folder = os.path.join(directory, source)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{source}_{index:05d}.png")
        Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
        paths.append(path)
    return paths

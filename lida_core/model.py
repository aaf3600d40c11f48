"""Embedding networks: a registry of profiles, each carrying its preprocessing as data.

A profile is what timm/open_clip call a pretrained config: the architecture together with
its input size, embedding dimension, input normalisation and preferred fingerprint
settings. `build_model(name)` returns an `Embedder`: float N x 3 x S x S in [0, 1]
(see `fingerprint.to_model_input`) -> N x D features (not normalised).

- `paper`: ResNet-50 without the max-pool (layer1 keeps stride 1), 256 x 256 input,
  2048-d pooled feature; parameter names are torchvision's, so the authors' `.pth`
  loads through `load_upstream_weights` (`backbone.*` kept, `fc.*` dropped).
- `small`: a CPU profile: full-resolution residual stages before any down-sampling, so
  the network sees the fingerprint's pixel-level pattern, then four stride-2 stages;
  128 x 128 input, 256-d feature. Numbers: benchmarks/model_speed.py, docs/results.md.
- `phase`: `small` behind a phase stem (wrapped low-bit neighbour differences as angles).
- `stats`: fixed low-bit co-occurrence statistics (`StatsStem`) under a learned residual
  head that starts as the identity: training-free retrieval from the first use, adapted on
  the gallery. Cheap enough for any CPU.

Checkpoints are plain dicts of tensors and strings, read with `torch.load(weights_only=True)`,
and carry the profile and fingerprint settings they were trained with.

Over 400 lines on purpose: the registry, the networks and stems it names, and the checkpoint
format that records them change together; a profile is read here from top to bottom.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from lida_core.fingerprint import FingerprintSettings, low_bit_boxes

CHECKPOINT_FORMAT = "lida-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: unreadable, or made for other settings."""


# ---------------------------------------------------------------- ResNet-50 (torchvision names)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Backbone(nn.Module):
    """torchvision's resnet50 layout (same parameter names), max-pool removed, no fc."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # The paper removes the max-pool so that fine noise survives the stem.
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# ---------------------------------------------------------------- small CPU network


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallBackbone(nn.Module):
    """Full-resolution stem and first stage (no early down-sampling), then stride-2 stages."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 256), embedding_dim: int = 256, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(widths[0], widths[0])
        stages = []
        for inplanes, planes in zip(widths[:-1], widths[1:], strict=True):
            stages.append(BasicBlock(inplanes, planes, stride=2))
        self.stages = nn.Sequential(*stages)
        # Mean and max pooling: noise statistics (mean) and sparse periodic peaks (max).
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.maxpool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(2 * widths[-1], embedding_dim)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        x = self.stages(x)
        pooled = torch.cat([torch.flatten(self.avgpool(x), 1), torch.flatten(self.maxpool(x), 1)], 1)
        return self.head(pooled)


class _LowBitStem(nn.Module):
    """A weightless stem that reads the low-bit values back from a scaled fingerprint."""

    kind = "low-bit"
    whole_image = False  # True where the stem's statistics need the whole image, not one small patch

    def __init__(self, settings: FingerprintSettings):
        super().__init__()
        if settings.mode != "scale":
            raise ValueError(f"the {self.kind} stem needs scaled low bits (mode 'scale'), not binary ones")
        if self.whole_image and settings.region != "full":
            raise ValueError(f"the {self.kind} stem reads statistics of the whole image, not of one patch")
        self.levels = 2**settings.bits
        self.step = settings.scale_factor / 255.0


class PhaseStem(_LowBitStem):
    """Kept low bits as wrapped differences on a circle: the wrap-around of `x mod 2^bits` made visible.

    A low-bit value v (0..2^b-1) is the signal modulo 2^b. Two neighbours 7 and 0 are one grey
    level apart, yet a convolution on `(x & 7) * 36` sees a jump of 252. The stem takes the
    differences to the right and lower neighbours modulo 2^b and encodes them as angles
    (cos, sin of 2*pi*d / 2^b): 12 channels. This cancels the content's smooth offset, which
    lives in the high planes, and keeps the decoder's local structure. It has no weights, and
    the fingerprint itself is unchanged.

    Measured on the samples (benchmarks/sample_separability.py protocol, supervised, 20 epochs):
    held-out accuracy 0.818 with this stem, 0.464 on the plain fingerprint, and 0.593 with the
    values themselves as angles.
    """

    channels = 12
    kind = "phase"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.round(x / self.step)
        dx = torch.roll(v, -1, dims=3) - v
        dy = torch.roll(v, -1, dims=2) - v
        angles = torch.cat([dx, dy], dim=1) * (2 * math.pi / self.levels)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _wrapped_histograms(d: torch.Tensor, bins: int) -> torch.Tensor:
    """N x ... integer codes in [0, bins) -> N x bins relative frequencies (one bincount for the batch)."""
    n = d.shape[0]
    codes = d.reshape(n, -1) + torch.arange(n, device=d.device, dtype=d.dtype).view(n, 1) * bins
    counts = torch.bincount(codes.reshape(-1), minlength=n * bins).view(n, bins).float()
    return counts / counts.sum(1, keepdim=True).clamp_min(1.0)


class StatsStem(_LowBitStem):
    """Co-occurrence statistics of the kept low bits: a fixed descriptor from the forensics literature.

    With v the low-bit value (0..2^b-1) and d the wrapped difference to the next pixel
    (`(v[i+1] - v[i]) mod 2^b`), per direction (right, down) and colour channel:
    - the histogram of d, and of consecutive pairs (d[i], d[i+1]): SPAM (Pevny et al. 2010);
    - the joint histogram of d in two channels at one pixel, for the three channel pairs:
      colour co-occurrences (Goljan et al. 2014), where demosaicing and a decoder's colour
      mixing differ;
    - |histogram of d at even positions - at odd positions|: period-2 structure, the trace
      of x2 up-sampling (Popescu and Farid 2005), invariant to where a crop starts.
    Each histogram is normalised, square-rooted (Hellinger) and the whole L2-normalised, so
    cosine retrieval on the raw descriptor already works. Directional on purpose: up-sampling
    kernels are not symmetric, so training views of this stem are not turned or flipped.
    2 x (3 x 8 + 3 x 64 + 3 x 64 + 3 x 8) = 864 values for 3 bits.
    """

    kind = "statistics"
    whole_image = True

    def __init__(self, settings: FingerprintSettings):
        super().__init__(settings)
        self.dim = StatsStem.size(settings.bits)

    @staticmethod
    def size(bits: int = 3) -> int:
        levels = 2**bits
        return 2 * 3 * (2 * levels + 2 * levels * levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.levels
        v = torch.round(x.float() / self.step).long().clamp_(0, levels - 1)
        parts = []
        for axis in (3, 2):  # right, then down
            w = v.movedim(axis, -1)  # neighbours along the last dimension
            d = (w[..., 1:] - w[..., :-1]) % levels
            for c in range(3):
                a = d[:, c]
                pairs = a[..., :-1] * levels + a[..., 1:]
                even = a[..., : a.shape[-1] // 2 * 2]
                parity = (_wrapped_histograms(even[..., 0::2], levels) - _wrapped_histograms(even[..., 1::2], levels)).abs()
                parts += [_wrapped_histograms(a, levels), _wrapped_histograms(pairs, levels * levels), parity]
            for c1, c2 in ((0, 1), (1, 2), (0, 2)):
                parts.append(_wrapped_histograms(d[:, c1] * levels + d[:, c2], levels * levels))
        f = torch.cat(parts, 1).sqrt()
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


class StatsHead(nn.Module):
    """x + W2 relu(W1 x) with W2 = 0 at first: the untrained embedding is the descriptor itself."""

    def __init__(self, dim: int = StatsStem.size(), hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class SrmStem(_LowBitStem):
    """Co-occurrences of SRM-style residuals of the kept low bits (Fridrich and Kodovsky 2012), modulo 2^bits.

    An integer high-pass residual of the pixels (a difference of neighbours, a second or third
    difference, the 3 x 3 "KB" kernel) taken modulo 2^b depends only on the low b bits, so it
    is computable from the fingerprint. Wrapped to [-2^(b-1), 2^(b-1)) it equals the true
    residual wherever that is small, which is where generator noise lives; large (edge)
    residuals wrap and land anywhere. Each residual is truncated to [-T, T] and summarised by
    the histogram over the whole view of the triple of the three colour channels' residuals at
    one pixel (a cross-band co-occurrence): 7 kernels x (2T + 1)^3 values, each histogram
    normalised and square-rooted. No weights; directional, so training views are never turned
    or flipped.

    `truncation` is T: 2 (7 x 125 = 875 values) for every model made before session 19 and
    the `srm-split` profile; 3 (7 x 343 = 2401) for `srm` since session 19. Modulo 8 a
    residual wraps to [-4, 3], so at T = 3 only -4 is merged into -3: the histogram keeps
    almost all of what the low bits' residuals say (docs/results.md, session 19).

    `pairs=True` is the layout of models made before session 14: per kernel, two histograms of
    neighbour pairs (along the kernel's direction and across it, channels pooled, as rich
    models count them) before the triple, 7 x (25 + 25 + 125) = 1225 values. On the devset the
    pairs added nothing to the triples (equal or lower Rank-1, detection and JPEG figures,
    docs/results.md) and were most of the counting; such checkpoints still load and describe
    as they were fitted.

    `split=True` (the `srm-split` profile, session 18) counts each kernel's triples in three
    histograms, by the content class of the pixel (`srm._box_classes`: the luma's high 5 bits
    flat, gently or strongly changing around it), each normalised on its own: 7 x 3 x 125 =
    2625 values. In flat regions the low bits hold sensor or generator noise; in textured ones
    the residuals modulo 8 are mostly the image's own edges. One histogram mixed the two in
    proportions the content set; split, the noise is read apart and the proportions (content)
    drop out. The classes need the pixels' high bits, so a split stem describes decoded pixels
    (`describe`) and not fingerprints, which keep the low bits only.

    `quiet=True` (`srm` models since session 28; truncation 3) keeps the whole-view triples and
    appends each kernel's triples counted in the flat and in the gentle pixels alone, truncated
    at 2 (`srm.quiet_counts`): 7 x 343 + 7 x 2 x 125 = 4151 values. Flat and gently changing
    regions are where the low bits hold noise and no edges; the textured class, where the
    residuals modulo 8 are mostly the content's own edges, is left out. On the devset the
    flat and gentle histograms carried the split's gain and the textured ones none
    (docs/results.md, session 28). It reads decoded pixels, as a split stem does, and costs one
    split counting pass.
    """

    kind = "SRM"
    whole_image = True

    def __init__(self, settings: FingerprintSettings, pairs: bool = False, split: bool = False, truncation: int = 2,
                 quiet: bool = False):
        super().__init__(settings)
        if settings.bits != 3:
            raise ValueError(f"the SRM stem reads residuals modulo 2^3: it needs 3 kept bits, not {settings.bits}")
        for name, value in (("pairs", pairs), ("split", split), ("quiet", quiet)):
            if not isinstance(value, bool):
                raise ValueError(f"the SRM stem's {name!r} option is true or false, not {value!r}")
        if pairs and split:
            raise ValueError("the SRM stem splits the colour triples alone: 'pairs' and 'split' do not go together")
        if isinstance(truncation, bool) or truncation not in (2, 3):  # lida_core.srm.TRUNCATIONS
            raise ValueError(f"the SRM stem's 'truncation' option is 2 or 3, not {truncation!r}")
        if quiet and (pairs or split or truncation != 3):
            raise ValueError("the SRM stem's 'quiet' option takes the colour triples at truncation 3, unsplit")
        self.pairs, self.split, self.truncation, self.quiet = pairs, split, truncation, quiet
        self.dim = SrmStem.size(truncation, pairs=pairs, split=split, quiet=quiet)

    @property
    def options(self) -> dict:
        """What a checkpoint records to rebuild this stem (`Profile.stem_options`)."""
        return {"pairs": self.pairs, "split": self.split, "truncation": self.truncation, "quiet": self.quiet}

    @property
    def reads_classes(self) -> bool:
        """Whether the descriptor needs each pixel's content class (split or quiet): it reads decoded pixels, not fingerprints."""
        return self.split or self.quiet

    @staticmethod
    def size(truncation: int = 2, pairs: bool = False, split: bool = False, quiet: bool = False) -> int:
        levels = 2 * truncation + 1
        # lida_core.srm.KERNELS, SPLIT_CLASSES; quiet: QUIET_CLASSES at QUIET_TRUNCATION (5^3 bins)
        return 7 * ((2 * levels**2 if pairs else 0) + levels**3 * (3 if split else 1) + (2 * 125 if quiet else 0))

    def _fingerprints_only(self) -> None:
        if self.reads_classes:
            which = "split" if self.split else "quiet"
            raise ValueError(f"the {which} SRM stem needs each pixel's content class, which a fingerprint (the low bits "
                             "alone) does not keep: describe decoded pixels (SrmStem.describe)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lida_core import srm  # numba compiles (or loads from its cache) on first use

        self._fingerprints_only()
        v = torch.round(x.float() / self.step).clamp_(0, self.levels - 1).to(torch.uint8)
        counts = srm.srm_counts(v.permute(0, 2, 3, 1).contiguous().cpu().numpy(), pairs=self.pairs, truncation=self.truncation)
        return self.from_counts(counts).to(x.device)

    def from_low_bits(self, kept: torch.Tensor) -> torch.Tensor:
        """N x H x W x 3 kept low bits (uint8, `x & 7`, as `accel.prepare` makes them) -> descriptors.

        The same values as `forward` on their scaled fingerprint, without its float round trip
        (scale, divide, round: 30% of the embed time once the counting was compiled).
        """
        from lida_core import srm

        self._fingerprints_only()
        return self.from_counts(srm.srm_counts(kept.cpu().numpy(), pairs=self.pairs, truncation=self.truncation)).to(kept.device)

    def describe(self, images: Sequence[np.ndarray], settings: FingerprintSettings, size: int,
                 tiles: int) -> tuple[torch.Tensor, np.ndarray]:
        """Decoded images -> (descriptors of all their tile views, V x dim; the image of each view).

        Straight from the pixels: the values `forward` gives on each view's fingerprint, without
        making the fingerprints (no `x & 7`, tile copies, stacking or transposing; lida_core.srm).
        """
        from lida_core import srm

        sources, owners = [], []
        for i, image in enumerate(images):
            parts = low_bit_boxes(image, settings, size, tiles, whole=self.reads_classes)
            sources += parts
            owners += [i] * sum(len(boxes) for _, boxes in parts)
        if self.quiet:  # one split pass, then the whole-view and the quiet classes' histograms from it
            counts = srm.quiet_counts(srm.pixel_counts(sources, split=True, truncation=self.truncation), self.truncation)
        else:
            counts = srm.pixel_counts(sources, pairs=self.pairs, split=self.split, truncation=self.truncation)
        return self.from_counts(counts), np.asarray(owners, dtype=np.int64)

    def from_counts(self, counts: np.ndarray) -> torch.Tensor:
        """Integer counts (srm's layout) -> the descriptor: each histogram normalised, then square-rooted."""
        from lida_core import srm

        counts = torch.from_numpy(counts).float()
        spans = srm.quiet_slices(self.truncation) if self.quiet else srm.histogram_slices(self.pairs, self.split, self.truncation)
        parts = [h / h.sum(1, keepdim=True).clamp_min(1.0) for h in (counts[:, span] for span in spans)]
        return torch.cat(parts, 1).sqrt()


class StatisticalHead(nn.Module):
    """(x - mean) @ weight: a linear map fitted in closed form (`lida_core.statistical`), not by SGD.

    Until it is fitted it is a fixed random orthonormal projection (a Johnson-Lindenstrauss
    map, so cosine retrieval on the raw descriptor roughly survives). `reference` keeps the
    descriptors of the real images the fit used (pre-training's, with their JPEG copies), so
    that adaptation can refit with the gallery without the original images; `calibration` keeps
    the descriptors of JPEG copies of those images at each quality of `statistical.CALIBRATION_QUALITIES`,
    which only calibrate the per-quality JPEG thresholds (they are never fitted). Their row counts
    vary, and loading takes the saved ones (a model saved before `calibration` existed has none).
    """

    def __init__(self, dim: int = SrmStem.size(), out: int = 128):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, out, generator=generator))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("reference", torch.zeros(0, dim))
        self.register_buffer("calibration", torch.zeros(0, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("reference", "calibration"):
            saved = state_dict.get(prefix + name)
            if saved is None and name == "calibration":  # saved before per-quality calibration: none
                state_dict[prefix + name] = saved = torch.zeros(0, self.reference.shape[1])
            if isinstance(saved, torch.Tensor) and saved.ndim == 2 and saved.shape[1] == self.reference.shape[1]:
                setattr(self, name, torch.zeros_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- profiles and the embedder


@dataclass(frozen=True)
class Profile:
    name: str
    input_size: int
    embedding_dim: int
    fingerprint: FingerprintSettings
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    builder: Callable[[], nn.Module]
    description: str
    tiles: int = 1  # an image's embedding averages up to this many input-size tiles (crop fit only)
    stem: str = "none"  # "phase" / "stats": PhaseStem / StatsStem before the backbone, instead of mean/std normalisation
    stem_options: dict = field(default_factory=dict)  # the stem's keyword arguments; checkpoints record them (LEGACY_STEM_OPTIONS)
    turns: bool = True  # training views may be turned and flipped (False: the features are directional)
    detection: str = "prototype"  # default real/generated rule (workspace.DETECTIONS); a workspace's config may override
    fit: str = "sgd"  # "closed-form": the head is fitted by `lida_core.statistical`, not trained by gradient descent
    calibration_share: float = 0.1  # share of pre-training's real images held out to calibrate the real threshold (networks)
    # Training defaults (`lida pretrain` / `lida adapt` flags override epochs and lr). The CPU
    # network trains from scratch and needs a larger step to move within minutes. It adapts on
    # 16 views of 64 px per gallery image instead of 4 of 128 px (the same pixels per epoch):
    # more distinct samples from 5 images (3-seed 5-shot means in docs/results.md).
    pretrain: dict = field(default_factory=lambda: {"epochs": 15, "batch_size": 64, "lr": 1e-3})
    # epochs, lr, view_size, views_per_image, and any other `training.AdaptConfig` field
    adapt: dict = field(default_factory=lambda: {"epochs": 60, "lr": 1e-3, "view_size": 64, "views_per_image": 16})


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

PROFILES: dict[str, Profile] = {}


def register_profile(profile: Profile) -> Profile:
    PROFILES[profile.name] = profile
    return profile


register_profile(
    Profile(
        name="paper",
        input_size=256,
        embedding_dim=2048,
        # The authors' released preprocessing: scaled low bits of the full image, resized.
        fingerprint=FingerprintSettings(bits=3, mode="scale", region="full", fit="resize", size=256),
        # The authors normalise with torchvision's ImageNet statistics.
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        builder=ResNet50Backbone,
        description="ResNet-50, no max-pool, 256x256, 2048-d (the paper's encoder; for GPUs)",
        # The paper's numbers: L_A + 0.9 L_D exactly (no cross-entropy), p_r the pre-training real mean.
        pretrain={"epochs": 30, "batch_size": 32, "lr": 1e-4},
        adapt={"epochs": 100, "lr": 1e-4, "view_size": 0, "views_per_image": 4, "beta": 0.0, "loss": "paper",
               "prototype": "pretraining"},
    )
)
register_profile(
    Profile(
        name="small",
        input_size=128,
        embedding_dim=256,
        # A crop keeps every kept bit in place; resizing would blend neighbouring noise.
        fingerprint=FingerprintSettings(bits=3, mode="scale", region="full", fit="crop", size=128),
        mean=(0.5, 0.5, 0.5),
        std=(0.3, 0.3, 0.3),
        builder=SmallBackbone,
        description="full-resolution residual CNN, 128x128, 256-d (for CPUs)",
        # Four tiles read four times the noise of one crop: +6 points Rank-1 (docs/results.md).
        tiles=4,
    )
)
register_profile(
    replace(
        PROFILES["small"],
        name="phase",
        builder=lambda: SmallBackbone(in_channels=PhaseStem.channels),
        description="the small CPU network behind a phase stem (wrapped low-bit neighbour differences as angles)",
        stem="phase",
        # Crops only: with turned and flipped views 5-shot Rank-1 was 0.60 and AUROC 0.87,
        # without them 0.73 and 1.00 (3 seeds, docs/results.md). `small` showed no such gain.
        turns=False,
    )
)
register_profile(
    replace(
        PROFILES["small"],
        name="stats",
        embedding_dim=StatsStem.size(),
        builder=StatsHead,
        description="fixed low-bit co-occurrence statistics under a learned residual head (identity at first)",
        stem="stats",
        turns=False,
        detection="contrast",
        # The centre loss alone: the real-prototype and softmax terms lowered 5-shot Rank-1 to
        # 0.65 (3 seeds; docs/results.md); detection uses the contrast rule instead.
        adapt={"epochs": 100, "lr": 1e-3, "view_size": 0, "views_per_image": 4, "lam": 0.0, "beta": 0.0},
    )
)


register_profile(
    replace(
        PROFILES["small"],
        name="srm",
        input_size=256,
        embedding_dim=128,
        # A colour JPEG is read in its decoder's YCbCr, before the rounding RGB conversion
        # (`lida_core.decode`): JPEG 90 AUROC +0.06 on the devset (docs/results.md, session 17).
        # Models made before keep "rgb" (their settings string says so).
        fingerprint=FingerprintSettings(bits=3, mode="scale", region="full", fit="crop", size=256, jpeg="ycc"),
        builder=StatisticalHead,
        description="co-occurrences of SRM residuals of the low bits under a closed-form whitening head (the CPU default)",
        tiles=4,
        stem="srm",
        turns=False,
        detection="quadratic",
        fit="closed-form",
        # No held-out slice: a closed-form fit keeps every pre-training photograph and cross-fits
        # its threshold (`statistical.cross_fitted_scores`); `calibration_share` is the networks'.
        # The colour triples alone since session 14; residuals truncated at 3 since session 19
        # (over 60 paired devset draws, PNG attribution +0.051 in all 60, JPEG 90 +0.012, the
        # false-positive rates at the 5% target on PNG and unchanged on JPEG; docs/results.md).
        # Since session 28 also the triples of flat and of gently changing pixels (`SrmStem`'s quiet option).
        stem_options={"pairs": False, "split": False, "truncation": 3, "quiet": True},
    )
)


register_profile(
    replace(
        PROFILES["srm"],
        name="srm-split",
        description="srm with each colour-triple histogram split by the content class of its pixel (flat, gentle, "
                    "textured; 2625 values): JPEG attribution +0.04 on the devset, but on PNG real photographs of "
                    "unseen collections flagged 12% of the time against 2% unsplit; truncated at 2 (docs/results.md, session 18)",
        stem_options={"pairs": False, "split": True, "truncation": 2},  # as measured in session 18
    )
)

# The stem options of checkpoints that do not record theirs: every srm model made before
# session 14 counted the neighbour pairs too (1225 values). A checkpoint that records some
# options takes the stem's own defaults for the others (`load_checkpoint`), never the
# profile's current ones: an srm model of sessions 14-17 records {"pairs": False} and was not split.
LEGACY_STEM_OPTIONS = {"srm": {"pairs": True}}
STEMS = {"phase": PhaseStem, "stats": StatsStem, "srm": SrmStem}


class Embedder(nn.Module):
    """Input normalisation + backbone; carries the profile it was built from."""

    def __init__(self, profile: Profile, fingerprint: FingerprintSettings | None = None, stem_options: dict | None = None):
        super().__init__()
        self.profile = profile.name
        self.input_size = profile.input_size
        self.embedding_dim = profile.embedding_dim
        self.fingerprint = (fingerprint or profile.fingerprint).with_size(profile.input_size)
        self.tiles = profile.tiles
        self.turns = profile.turns
        self.fit = profile.fit
        options = {**profile.stem_options, **(stem_options or {})}
        if profile.stem == "none" and options:
            raise ValueError(f"the {profile.name} profile has no stem to take options {options}")
        self.stem = STEMS[profile.stem](self.fingerprint, **options) if profile.stem != "none" else None
        # A closed-form head is as wide as its stem's descriptor (which stem options change).
        self.backbone = profile.builder(self.stem.dim) if profile.fit == "closed-form" else profile.builder()
        # Not persistent: part of the profile, not of the weights (and absent upstream).
        self.register_buffer("input_mean", torch.tensor(profile.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(profile.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(
                f"{self.profile} model expects N x 3 x {self.input_size} x {self.input_size}, got {tuple(x.shape)}"
            )
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding of inputs of any size (pooling is global); training uses smaller views."""
        if self.stem is not None:
            return self.backbone(self.stem(x))
        return self.backbone((x - self.input_mean) / self.input_std)


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown model profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


def build_model(profile: str = "small", fingerprint: FingerprintSettings | None = None,
                stem_options: dict | None = None) -> Embedder:
    """A freshly initialised embedder for `profile` (see PROFILES); `stem_options` override the profile's."""
    return Embedder(get_profile(profile), fingerprint, stem_options)


# ---------------------------------------------------------------- checkpoints


def checkpoint_bytes(model: Embedder, metadata: dict | None = None) -> bytes:
    """A self-describing checkpoint as bytes (see `save_checkpoint`)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "profile": model.profile,
        "fingerprint": str(model.fingerprint),
        "input_size": model.input_size,
        "embedding_dim": model.embedding_dim,
        "stem_options": dict(getattr(model.stem, "options", {})),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_checkpoint(model: Embedder, path: str, metadata: dict | None = None) -> None:
    """Write a self-describing checkpoint atomically (temporary name, then rename)."""
    data = checkpoint_bytes(model, metadata)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(os.path.abspath(fs_path)) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, fs_path)
    else:
        tmp = fs_path + ".tmp"
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, fs_path)


def _read_torch(path: str, data: bytes | None = None) -> object:
    if data is None:
        try:
            with fsspec.open(path, "rb") as handle:
                data = handle.read()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from None
    try:
        # weights_only: a checkpoint is untrusted input and must not run code when loaded.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None


def load_checkpoint(
    path: str, profile: str | None = None, fingerprint: FingerprintSettings | str | None = None, data: bytes | None = None
) -> tuple[Embedder, dict]:
    """Load a lida checkpoint; refuse it if it was made for another profile or fingerprint."""
    payload = _read_torch(path, data)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a lida checkpoint (for the authors' .pth use load_upstream_weights)")
    saved_profile = payload.get("profile")
    saved_fp = payload.get("fingerprint")
    if profile is not None and saved_profile != profile:
        raise CheckpointError(f"{path}: checkpoint is for profile {saved_profile!r}, not {profile!r}")
    if fingerprint is not None and saved_fp != str(fingerprint):
        raise CheckpointError(
            f"{path}: checkpoint was trained on fingerprints {saved_fp!r}, not {str(fingerprint)!r}"
        )
    options = payload.get("stem_options", LEGACY_STEM_OPTIONS.get(saved_profile, {}))
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise CheckpointError(f"{path}: checkpoint's stem options are not a mapping of names: {str(options)[:200]}")
    try:
        settings = FingerprintSettings.parse(saved_fp)
        model = build_model(saved_profile, settings, {**_stem_defaults(saved_profile), **options})
    except (ValueError, TypeError) as exc:  # TypeError: an option the stem does not take
        raise CheckpointError(f"{path}: {str(exc)[:300]}") from None
    if settings.size != model.input_size or payload.get("embedding_dim") != model.embedding_dim:
        raise CheckpointError(f"{path}: checkpoint sizes do not match profile {saved_profile!r}")
    _load_state(model, payload.get("state_dict"), path)
    return model, dict(payload.get("metadata") or {})


def _stem_defaults(profile: object) -> dict:
    """The keyword defaults of a profile's stem: what a checkpoint that does not record an option was made with."""
    stem = STEMS.get(PROFILES[profile].stem) if isinstance(profile, str) and profile in PROFILES else None
    if stem is None:
        return {}
    params = inspect.signature(stem.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "settings") and p.default is not inspect.Parameter.empty}


def _load_state(model: nn.Module, state: object, path: str) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint has no state dict")
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (first: {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys (first: {result.unexpected_keys[0]})")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the model: " + "; ".join(problems))


def upstream_state_dict(state: dict) -> dict:
    """The authors' key mapping: `backbone.*` -> our backbone, `fc.*` (classifier) dropped.

    Also accepts the wrappers training scripts add (`module.` from DataParallel, a
    `state_dict`/`model` entry) and a bare torchvision resnet50 state dict.
    """
    for key in ("state_dict", "model", "net"):
        if isinstance(state.get(key), dict):
            state = state[key]
    mapped = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        key = key.removeprefix("module.")
        if key.startswith("fc.") or key.startswith("backbone.fc."):
            continue
        if not key.startswith("backbone."):
            key = "backbone." + key
        mapped[key] = value
    return mapped


def load_upstream_weights(path: str) -> Embedder:
    """A `paper` model from the authors' released ResNet-50 `.pth`."""
    payload = _read_torch(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a state dict")
    model = build_model("paper")
    mapped = upstream_state_dict(payload)
    for key, value in mapped.items():
        expected = model.state_dict().get(key)
        if expected is not None and expected.shape != value.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}")
    _load_state(model, mapped, path)
    return model

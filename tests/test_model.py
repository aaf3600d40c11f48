"""Profiles, the paper's ResNet-50 layout, upstream key mapping and safe checkpoints."""

import os
import pickle

import pytest
import torch
from torch import nn

from lida_core.fingerprint import FingerprintSettings
from lida_core.model import (
    PROFILES,
    CheckpointError,
    build_model,
    load_checkpoint,
    load_upstream_weights,
    save_checkpoint,
    upstream_state_dict,
)


def torchvision_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """torchvision.models.resnet50().state_dict() names and shapes, restated from its layout."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def fake_upstream(prefix="backbone.", seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in torchvision_resnet50_shapes().items():
        if name.endswith("num_batches_tracked"):
            value = torch.tensor(7)
        else:
            value = torch.randn(shape, generator=g)
        state[name if name.startswith("fc.") else prefix + name] = value
    return state


def test_paper_profile_is_the_papers_encoder():
    model = build_model("paper")
    assert (model.input_size, model.embedding_dim) == (256, 2048)
    assert isinstance(model.backbone.maxpool, nn.Identity)
    assert model.backbone.layer1[0].conv2.stride == (1, 1)
    assert str(model.fingerprint) == "b3-scale-full-resize256"
    # the authors normalise the fingerprint with torchvision's ImageNet statistics
    assert model.input_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert model.input_std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    own = {k[len("backbone."):]: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: v for k, v in torchvision_resnet50_shapes().items() if not k.startswith("fc.")}
    assert own == expected
    model.eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 256, 256))
    assert tuple(out.shape) == (1, 2048)


def test_small_profile_keeps_full_resolution_first():
    model = build_model("small").eval()
    assert model.input_size == 128
    first = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)][:3]
    assert all(conv.stride == (1, 1) for conv in first)
    with torch.inference_mode():
        out = model(torch.rand(3, 3, 128, 128))
    assert tuple(out.shape) == (3, model.embedding_dim)
    with pytest.raises(ValueError, match="expects N x 3 x 128 x 128"):
        model(torch.rand(1, 3, 64, 64))


def test_every_profile_carries_its_preprocessing():
    for name, profile in PROFILES.items():
        model = build_model(name)
        assert model.fingerprint.size == profile.input_size == model.input_size
    with pytest.raises(ValueError, match="unknown model profile"):
        build_model("huge")


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict"])
def test_upstream_weights_load_through_the_key_mapping(tmp_path, wrap):
    state = fake_upstream()
    if wrap == "module":
        state = {"module." + k: v for k, v in state.items()}
    elif wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    path = tmp_path / "lida_resnet50.pth"
    torch.save(state, path)
    model = load_upstream_weights(str(path))
    reference = fake_upstream()
    loaded = model.state_dict()
    assert torch.equal(loaded["backbone.layer3.4.conv2.weight"], reference["backbone.layer3.4.conv2.weight"])
    assert torch.equal(loaded["backbone.bn1.running_var"], reference["backbone.bn1.running_var"])
    assert not any(k.startswith("backbone.fc") for k in loaded)


def test_upstream_mapping_accepts_bare_torchvision_names():
    bare = {k.removeprefix("backbone."): v for k, v in fake_upstream().items()}
    mapped = upstream_state_dict(bare)
    assert "backbone.conv1.weight" in mapped and "fc.weight" not in mapped and "backbone.fc.weight" not in mapped


def test_upstream_with_wrong_shapes_or_missing_keys_is_refused(tmp_path):
    state = fake_upstream()
    state["backbone.layer1.0.conv1.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight has shape"):
        load_upstream_weights(str(tmp_path / "bad.pth"))
    partial = {k: v for k, v in fake_upstream().items() if "layer4" not in k}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_upstream_weights(str(tmp_path / "partial.pth"))


def test_checkpoint_round_trip_carries_profile_and_fingerprint(tmp_path):
    model = build_model("small")
    path = str(tmp_path / "v1" / "model.pt")
    save_checkpoint(model, path, {"parent": "v0"})
    loaded, metadata = load_checkpoint(path, profile="small", fingerprint=model.fingerprint)
    assert metadata == {"parent": "v0"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert [p for p in os.listdir(tmp_path / "v1")] == ["model.pt"]  # no temporary left behind


def test_checkpoint_mismatch_is_a_clear_error(tmp_path):
    model = build_model("small")
    path = str(tmp_path / "model.pt")
    save_checkpoint(model, path)
    with pytest.raises(CheckpointError, match="profile 'small', not 'paper'"):
        load_checkpoint(path, profile="paper")
    with pytest.raises(CheckpointError, match="trained on fingerprints"):
        load_checkpoint(path, fingerprint=FingerprintSettings(mode="binary", fit="crop", size=128))
    custom = build_model("small", FingerprintSettings(mode="binary", fit="crop"))
    save_checkpoint(custom, path)
    loaded, _ = load_checkpoint(path)
    assert str(loaded.fingerprint) == "b3-binary-full-crop128"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lida-pwned",))


def test_checkpoints_never_execute_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "lida-checkpoint/1", "payload": _Exploit()}, handle)
    if os.path.exists("/tmp/lida-pwned"):
        os.remove("/tmp/lida-pwned")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError):
        load_upstream_weights(str(path))
    assert not os.path.exists("/tmp/lida-pwned")


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a lida checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_phase_stem_sees_low_bits_as_angles_and_wrapped_differences():
    import math

    import numpy as np

    from lida_core.fingerprint import fingerprint_bits, to_model_input
    from lida_core.model import PhaseStem

    settings = FingerprintSettings(bits=3, mode="scale", fit="crop", size=16)
    stem = PhaseStem(settings)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # room for +1 everywhere
    x = to_model_input(fingerprint_bits(pixels, settings)[None])
    out = stem(x)
    assert out.shape == (1, 12, 16, 16)
    v = torch.from_numpy((pixels & 7).astype(np.float32)).permute(2, 0, 1)
    right = (torch.roll(v, -1, dims=2) - v) % 8
    assert torch.allclose(out[0, 0:3], torch.cos(2 * math.pi * right / 8), atol=1e-5)  # wrapped difference to the right
    # Adding one grey level to the whole image wraps 7 -> 0 but leaves every difference channel unchanged.
    out2 = stem(to_model_input(fingerprint_bits(pixels + 1, settings)[None]))
    assert torch.allclose(out, out2, atol=1e-5)  # wrapped differences do not see the offset
    assert not torch.equal(x, to_model_input(fingerprint_bits(pixels + 1, settings)[None]))  # the fingerprint did change
    with pytest.raises(ValueError, match="scaled low bits"):
        PhaseStem(FingerprintSettings(mode="binary"))


def test_phase_profile_builds_embeds_and_round_trips(tmp_path):
    model = build_model("phase")
    assert model.backbone.conv1.in_channels == 12 and model.tiles == 4 and model.turns is False  # crops only
    x = torch.rand(2, 3, 128, 128)
    assert model(x).shape == (2, 256) and model.features(torch.rand(1, 3, 64, 64)).shape == (1, 256)
    path = str(tmp_path / "m.pt")
    save_checkpoint(model, path)
    loaded, _ = load_checkpoint(path, profile="phase", fingerprint=model.fingerprint)
    assert torch.allclose(loaded.eval()(x), model.eval()(x))


def _stats_reference(pixels, bits=3):
    """StatsStem's descriptor stated again in numpy, in its order (see the class docstring)."""
    import numpy as np

    levels = 2**bits
    v = (pixels & (levels - 1)).astype(np.int64)

    def hist(a, n):
        counts = np.bincount(a.ravel(), minlength=n).astype(np.float64)
        return counts / max(counts.sum(), 1.0)

    parts = []
    for axis in (1, 0):
        d = np.diff(v, axis=axis) % levels
        for c in range(3):
            a = d[..., c] if axis == 1 else d[..., c].T  # consecutive values along the last axis
            even = a[:, : a.shape[1] // 2 * 2]
            parts += [hist(a, levels), hist(a[:, :-1] * levels + a[:, 1:], levels * levels),
                      np.abs(hist(even[:, 0::2], levels) - hist(even[:, 1::2], levels))]
        for c1, c2 in ((0, 1), (1, 2), (0, 2)):
            parts.append(hist(d[..., c1] * levels + d[..., c2], levels * levels))
    f = np.sqrt(np.concatenate(parts))
    return f / np.linalg.norm(f)


def _stats_input(pixels):
    import numpy as np

    from lida_core.fingerprint import to_model_input

    return to_model_input(torch.from_numpy(((pixels & 7) * 36).astype(np.uint8))[None])


def test_stats_stem_is_the_low_bit_co_occurrence_descriptor():
    import numpy as np

    from lida_core.model import StatsStem

    stem = StatsStem(FingerprintSettings(bits=3, mode="scale", fit="crop", size=128))
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)  # odd sizes, room for +1 everywhere
    out = stem(_stats_input(pixels))[0]
    assert out.shape == (864,) and stem.dim == 864
    assert np.allclose(out.numpy(), _stats_reference(pixels), atol=1e-6)
    # Wrapped differences: one grey level more everywhere (7 -> 0 wraps) changes nothing.
    assert torch.allclose(stem(_stats_input(pixels + 1))[0], out, atol=1e-6)
    # Directional: a transposed image swaps the right and down halves, and is another descriptor.
    turned = stem(_stats_input(np.ascontiguousarray(pixels.transpose(1, 0, 2))))[0]
    assert torch.allclose(turned[:432], out[432:], atol=1e-6) and torch.allclose(turned[432:], out[:432], atol=1e-6)
    assert not torch.allclose(turned, out, atol=1e-3)
    for tiny in ((1, 1, 3), (1, 5, 3), (2, 2, 3)):  # too small for some statistics: zeros there, no error
        assert torch.isfinite(stem(_stats_input(np.zeros(tiny, np.uint8)))).all()
    with pytest.raises(ValueError, match="scaled low bits"):
        StatsStem(FingerprintSettings(mode="binary"))


def test_stats_stem_parity_block_sees_period_two_structure():
    import numpy as np

    from lida_core.model import StatsStem

    stem = StatsStem(FingerprintSettings(bits=3, mode="scale", fit="crop", size=128))
    flat = np.full((32, 32, 3), 8, dtype=np.uint8)
    columns = flat.copy()
    columns[:, 1::2] += 3  # low bits 0, 3, 0, 3 ... along each row: differences 3, 5, 3, 5
    parity_right = slice(72, 80)  # right-direction block, channel 0: 8 single, 64 pairs, then 8 parity bins
    assert float(stem(_stats_input(flat))[0, parity_right].abs().sum()) == 0.0
    assert float(stem(_stats_input(columns))[0, parity_right].sum()) > 0.1


def test_stats_profile_starts_as_the_descriptor_and_round_trips(tmp_path):
    import numpy as np

    model = build_model("stats").eval()
    assert model.tiles == 4 and model.turns is False and model.embedding_dim == 864
    assert build_model("small").turns is True
    pixels = np.random.default_rng(4).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    with torch.no_grad():
        assert np.allclose(model(_stats_input(pixels))[0].numpy(), _stats_reference(pixels), atol=1e-6)  # identity head at first
        assert model.features(_stats_input(pixels[:64, :64])).shape == (1, 864)  # any view size
    torch.nn.init.normal_(model.backbone.fc2.weight)  # a trained head moves away from the descriptor...
    path = str(tmp_path / "m.pt")
    save_checkpoint(model, path)
    loaded, _ = load_checkpoint(path, profile="stats", fingerprint=model.fingerprint)
    x = _stats_input(pixels)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model(x))  # ...and its weights come back
        assert not np.allclose(model(x)[0].numpy(), _stats_reference(pixels), atol=1e-3)


def test_training_views_keep_their_orientation_when_the_profile_says_so():
    import numpy as np

    from lida_core.training import random_view

    pixels = np.random.default_rng(5).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        view = random_view(pixels, 16, rng, turns=False)
        found = [(y, x) for y in range(25) for x in range(45) if np.array_equal(pixels[y : y + 16, x : x + 16], view)]
        assert len(found) == 1  # a plain crop, never turned or flipped
    turned = [random_view(pixels, 16, rng) for _ in range(20)]  # the default turns and flips
    plain = [any(np.array_equal(pixels[y : y + 16, x : x + 16], v) for y in range(25) for x in range(45)) for v in turned]
    assert not all(plain)


def test_paper_training_views_are_preprocessed_as_queries_are():
    """`paper` resizes the whole image's low bits to 256 for a query; its training views go the same way."""
    import numpy as np

    from lida_core.embed import model_inputs, tile_sums
    from lida_core.training import random_view

    model = build_model("paper")
    settings = model.fingerprint
    pixels = np.random.default_rng(7).integers(0, 256, (512, 384, 3), dtype=np.uint8)
    query = []
    tile_sums(model, [pixels], lambda x: query.append(x) or np.zeros((len(x), 1), np.float32), 1)  # the query's input
    rng = np.random.default_rng(0)
    view = random_view(pixels, model.input_size, rng, turns=False, fit=settings.fit)  # adaptation, classification pretext
    assert torch.equal(model_inputs([view], settings), query[0])

    def off_levels(x):  # share of input values that are not one of the 8 scaled low-bit levels
        levels = torch.arange(8) * settings.scale_factor / 255.0
        return float((x[..., None] - levels).abs().min(-1).values.gt(1e-6).float().mean())

    share = off_levels(query[0])
    assert share > 0.5  # a 512 px image resized to 256 blends neighbouring levels
    for part in (False, True):  # turned and flipped views, and the contrastive pretext's regions
        turned = [random_view(pixels, model.input_size, rng, turns=True, fit=settings.fit, part=part) for _ in range(4)]
        inputs = model_inputs(turned, settings)
        assert inputs.shape[-2:] == (256, 256) and abs(off_levels(inputs) - share) < 0.25


def test_pretraining_gives_the_same_weights_whatever_the_process_drew_before():
    """Two runs with one seed train identical models, even when the process's random state differs before them."""
    from dataclasses import replace

    import numpy as np

    from lida_core.training import PretrainConfig, pretrain

    images = [np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8) for i in range(8)]
    config = PretrainConfig(epochs=1, batch_size=4, view_size=32, seed=3)
    trained = []
    for before in (1, 2):
        torch.manual_seed(0)
        model = build_model("small")
        torch.manual_seed(before)  # stands for whatever a process did before pre-training
        head = pretrain(model, images, config)["head"]
        trained.append((model.state_dict(), head))
    (model_a, head_a), (model_b, head_b) = trained
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    torch.manual_seed(0)
    other = pretrain(build_model("small"), images, replace(config, seed=4))["head"]
    assert not torch.equal(head_a["net.0.weight"], other["net.0.weight"])  # ...and the seed is what decides

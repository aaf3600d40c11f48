"""The accelerated embed path on CPU tensors: the CPU/device fingerprint split is bit-identical,
DeviceEmbedder matches embed.embed, and exact_topk finds FAISS's neighbours."""

import os
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch
from test_fingerprint import ALL_SETTINGS

from lida_core import accel, embed
from lida_core.decode import decode_image
from lida_core.fingerprint import FingerprintSettings, fingerprint_bits, to_model_input
from lida_core.model import Embedder, build_model, get_profile


def _images(seed, sizes=((37, 53), (256, 256), (300, 171), (16, 400), (129, 128))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=str)
def test_cpu_half_then_device_half_equals_the_fingerprint(settings):
    for image in _images(1):
        kept = torch.from_numpy(accel.prepare(image, settings))[None]
        out = accel.finish(kept, settings)[0].numpy()
        np.testing.assert_array_equal(out, fingerprint_bits(image, settings))


def test_cpu_half_sends_only_low_bits():
    settings = FingerprintSettings(bits=3, fit="crop", size=128)
    kept = accel.prepare(_images(2)[2], settings)
    assert kept.dtype == np.uint8 and kept.shape == (128, 128, 3) and kept.max() <= 7


@pytest.mark.parametrize("fingerprint", [None, FingerprintSettings(bits=3, mode="binary", fit="resize", size=128)],
                         ids=["small-crop-tiles", "small-resize-binary"])
def test_device_embedder_matches_training_embed(fingerprint):
    torch.manual_seed(0)
    model = Embedder(get_profile("small"), fingerprint)
    images = _images(3) + _images(4)
    expected = embed.embed(model, images)
    fast = accel.DeviceEmbedder(model, "cpu", batch_size=3)  # small batches: several per size group
    assert not fast.reads_kept and not embed.reads_pixels(model)  # a network reads fingerprints, not pixels
    np.testing.assert_allclose(fast.embed(images), expected, atol=2e-5)


def test_srm_embedder_reads_the_kept_bits_as_the_float_path_does():
    """srm's unsplit stem (sessions 14-27) takes the kept low bits straight from the CPU half; the result is the float path's."""
    model = build_model("srm", stem_options={"quiet": False})
    fast = accel.DeviceEmbedder(model, "cpu", batch_size=3)
    assert fast.reads_kept and embed.reads_pixels(model)
    images = _images(3) + [np.random.default_rng(6).integers(0, 256, (600, 530, 3), dtype=np.uint8)]  # 4 tiles
    np.testing.assert_allclose(fast.embed(images), embed.embed(model, images), atol=1e-6)  # batches differ
    kept = torch.from_numpy(np.stack([accel.prepare(image, model.fingerprint) for image in images[:4]]))
    floats = to_model_input(accel.finish(kept, model.fingerprint))
    assert torch.equal(model.stem.from_low_bits(kept), model.stem(floats))  # the descriptors: bit for bit


@pytest.mark.parametrize("profile", ["srm-split", "srm"])
def test_split_srm_embed_files_decodes_whole_pixels_in_workers(tmp_path, profile):
    """The split and quiet stems need the high bits, which the kept-bits path drops: their workers send decoded pixels
    (JPEGs in YCbCr)."""
    from PIL import Image

    model = build_model(profile)
    assert model.stem.reads_classes and model.fingerprint.jpeg == "ycc"
    with pytest.raises(ValueError, match="content class"):
        model.stem.from_low_bits(torch.zeros((1, 8, 8, 3), dtype=torch.uint8))
    images = _images(5, sizes=((130, 140), (600, 530), (256, 256), (300, 171), (90, 80)))
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / (f"{i}.jpg" if i % 2 else f"{i}.png")
        Image.fromarray(image).save(path, **({"quality": 90} if i % 2 else {}))
        paths.append(str(path))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths.append(str(tmp_path / "bad.jpg"))
    emb, errors = accel.DeviceEmbedder(model, "cpu", batch_size=2).embed_files(paths, workers=2)
    assert list(errors) == [5] and not emb[5].any()
    decoded = [decode_image(open(p, "rb").read(), p, jpeg_space="ycc").pixels for p in paths[:5]]
    np.testing.assert_allclose(emb[:5], embed.embed(model, decoded), atol=1e-6)
    rgb = [decode_image(open(p, "rb").read(), p).pixels for p in paths[:5]]  # the JPEGs read in RGB would differ
    assert not np.allclose(emb[1::2][:2], embed.embed(model, rgb)[1::2][:2], atol=1e-3)


def test_device_embedder_surfaces_cpu_side_errors():
    model = build_model("small")
    with pytest.raises(ValueError):
        accel.DeviceEmbedder(model, "cpu").embed([np.zeros((40, 40), np.uint8)])


def test_exact_topk_finds_the_faiss_flat_neighbours():
    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(1000, 64)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.normal(size=(37, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(64)
    index.add(gallery)
    want_s, want_i = index.search(queries, 10)
    got_s, got_i = accel.exact_topk(queries, gallery, 10, "cpu", chunk=96)  # chunks that do not divide 1000
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    np.testing.assert_array_equal(got_i, want_i)
    small_s, small_i = accel.exact_topk(queries, gallery[:4], 10, "cpu")
    assert small_s.shape == (37, 4) and set(small_i[0]) == {0, 1, 2, 3}


def test_gallery_index_exact_search_agrees_with_faiss(tmp_path):
    from lida_core import index as gallery_index
    from lida_core.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(300, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"{i:064x}" for i in range(300)]
    sources = [["real", "a", "b"][i % 3] for i in range(300)]
    gallery_index.build_index(ws, "v0001", "b3-scale-full-crop128", ids, sources, vectors, 0.95)
    plain = gallery_index.open_index(ws)
    exact = gallery_index.open_index(ws)
    exact.exact_device = "cpu"
    queries = vectors[:20] + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    want_s, want_i = plain.search(queries, 7, "v0001")
    got_s, got_i = exact.search(queries, 7, "v0001")
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)


def test_embed_files_decodes_in_worker_processes(tmp_path):
    from PIL import Image

    torch.manual_seed(1)
    model = build_model("small")
    images = _images(8, sizes=((130, 140), (256, 300), (90, 90)))
    paths = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(1, str(tmp_path / "bad.png"))
    fast = accel.DeviceEmbedder(model, "cpu", batch_size=2)
    emb, errors = fast.embed_files(paths, workers=2)
    assert list(errors) == [1] and "bad.png" in errors[1]
    np.testing.assert_allclose(emb[[0, 2, 3]], embed.embed(model, images), atol=2e-5)
    assert not emb[1].any()


ALLOCATION_LOOP = """
import resource, sys
import numpy as np
from lida_core.allocator import keep_freed_memory
applied = keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    buffer = np.ones(64 * 2**20, dtype=np.uint8)  # a 64 MB activation-sized buffer (small pages), touched, then freed
    del buffer
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_remapping_large_buffers():
    """Freed 64 MB buffers are reused instead of unmapped and faulted in again; LIDA_MALLOC_TUNE=0 turns it off."""
    def faults(tune: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", ALLOCATION_LOOP], env=dict(os.environ, LIDA_MALLOC_TUNE=tune, NUMPY_MADVISE_HUGEPAGE="0"),
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    (on, with_tune), (off, without) = faults("1"), faults("0")
    assert (on, off) == ("True", "False")
    pages = 64 * 2**20 // 4096
    assert without >= 15 * pages  # every round maps and touches fresh pages
    assert with_tune <= 3 * pages  # the first round only

"""Calibrated decisions on hand-made embeddings: thresholds, real/generated/unknown."""

import json
from dataclasses import replace

import numpy as np
import pytest

from lida_core.decide import (
    Decider,
    calibrate_real_threshold,
    calibrate_unknown_threshold,
    detection_scores,
    generator_prototypes,
    leave_one_out_similarities,
    real_prototype,
)
from lida_core.fingerprint import tile_views
from lida_core.training import split_holdout


def unit(*rows):
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_real_threshold_holds_the_target_false_positive_rate(rng):
    scores = rng.normal(0.8, 0.05, 1000)
    for fpr in (0.01, 0.05, 0.2):
        threshold = calibrate_real_threshold(scores, fpr)
        assert np.mean(scores < threshold) <= fpr
        assert np.mean(scores < threshold) > fpr - 0.01
    with pytest.raises(ValueError):
        calibrate_real_threshold(np.array([]), 0.05)


def test_real_threshold_from_few_images_keeps_new_real_images_under_the_target(rng):
    """26 calibration images (pre-training's 10% of 256): the rate on new real images stays at 5%."""
    rates = []
    for _ in range(4000):
        threshold = calibrate_real_threshold(rng.normal(0.0, 1.0, 26), 0.05)
        rates.append(float(np.mean(rng.normal(0.0, 1.0, 200) < threshold)))
    assert np.mean(rates) <= 0.05  # expected k / (n + 1) = 1/27 here; the plain empirical quantile gave 2/27


def test_unknown_threshold_keeps_most_known_images():
    gallery = unit([1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0.1, 0.99, 0], [0, 0, 1])
    labels = ["g1", "g1", "g2", "g2", "real"]
    best = leave_one_out_similarities(gallery, labels)
    assert np.isnan(best[4]) and best[0] == pytest.approx(best[1])
    threshold = calibrate_unknown_threshold(gallery, labels, accept=1.0)
    assert threshold == pytest.approx(min(best[:4]))
    assert calibrate_unknown_threshold(gallery[[0, 2, 4]], ["g1", "g2", "real"]) is None


def test_leave_one_out_in_blocks_and_on_sampled_rows_agrees_with_the_whole_matrix(rng):
    x = rng.normal(size=(300, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.choice(["a", "b", "c"], 300)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    whole = np.where(labels[:, None] == labels[None, :], sim, -np.inf).max(1)
    np.testing.assert_allclose(leave_one_out_similarities(x, labels, block=7), whole)
    rows = np.array([3, 50, 299])
    np.testing.assert_allclose(leave_one_out_similarities(x, labels, rows, block=2), whole[rows])


def test_decider_says_real_generated_or_unknown():
    gallery = unit([1, 0, 0, 0], [0.98, 0.2, 0, 0], [0, 1, 0, 0], [0, 0.98, 0.2, 0], [0, 0, 0, 1], [0, 0, 0.2, 0.98])
    labels = ["g1", "g1", "g2", "g2", "real", "real"]
    proto = real_prototype(gallery[4:])
    decider = Decider(proto, real_threshold=0.9, unknown_threshold=0.9, k=3, top_k=3)
    queries = unit([0.05, 0, 0, 1], [1, 0.05, 0, 0], [0, 1, 0.05, 0], [0, 0, 1, 0])
    out = decider.decide(queries, gallery, labels)
    assert [o["predicted_source"] for o in out] == ["real", "g1", "g2", "unknown"]
    assert [o["is_generated"] for o in out] == [False, True, True, True]
    assert out[1]["topk_sources"][0] == "g1" and len(out[1]["topk_similarities"]) == 3
    assert out[1]["top1_similarity"] == pytest.approx(out[1]["topk_similarities"][0])
    centroid = Decider(proto, 0.9, None, method="centroid").decide(queries, gallery, labels)
    assert [o["predicted_source"] for o in centroid][:3] == ["real", "g1", "g2"]
    round_trip = Decider.from_dict(decider.to_dict())
    assert round_trip.real_threshold == 0.9 and np.allclose(round_trip.prototype, proto)


def test_contrast_detection_catches_what_the_real_prototype_alone_lets_through(rng):
    """Generated images that sit near the real prototype, but nearer still to a generator's."""
    real = unit(*(np.array([1.0, 0.0, 0.0, 0.0]) + rng.normal(0, 0.05, (40, 4))))
    generated = unit(*(np.array([1.0, 0.2, 0.0, 0.0]) + rng.normal(0, 0.03, (20, 4))))
    other = unit(*(np.array([0.0, 0.0, 1.0, 0.0]) + rng.normal(0, 0.05, (5, 4))))
    gallery = np.concatenate([real[:5], generated[:5], other])
    labels = ["real"] * 5 + ["gan"] * 5 + ["vae"] * 5
    prototype = real_prototype(real[:5])
    found = generator_prototypes(gallery, labels)
    assert list(found) == ["gan", "vae"] and np.allclose(np.linalg.norm(np.stack(list(found.values())), axis=1), 1)
    generators = np.stack(list(found.values()))
    calibration, queries = real[5:25], np.concatenate([real[25:], generated[5:]])
    truth = np.array([False] * 15 + [True] * 15)
    accuracy = {}
    for name, gens in (("prototype", None), ("contrast", generators)):
        threshold = calibrate_real_threshold(detection_scores(calibration, prototype, gens), 0.1)
        decider = Decider(prototype, threshold, None, generators=gens)
        called = np.array([d["is_generated"] for d in decider.decide(queries, gallery, labels)])
        accuracy[name] = (np.mean(called[truth]) + np.mean(~called[~truth])) / 2
    assert accuracy["contrast"] >= 0.95 > accuracy["prototype"]
    restored = Decider.from_dict(Decider(prototype, 0.1, None, generators=generators).to_dict())
    assert np.allclose(restored.generators, generators) and Decider.from_dict(Decider(prototype, 0.1, None).to_dict()).generators is None


def test_holdout_split_keeps_every_source_in_training():
    labels = ["a"] * 5 + ["b"] * 2 + ["c"] * 1
    train, held = split_holdout(labels, 0.2, seed=0)
    assert sorted(train + held) == list(range(8))
    assert {labels[i] for i in train} == {"a", "b", "c"}
    assert [labels[i] for i in held] == ["a"]


def test_holdout_split_holds_out_preferred_images_first_and_is_unchanged_by_its_own_held_out():
    labels = ["a"] * 10 + ["b"] * 5
    train, held = split_holdout(labels, 0.2, seed=4)
    # preferring exactly the images it held out gives the same split back
    assert split_holdout(labels, 0.2, seed=4, prefer=[i in held for i in range(15)]) == (train, held)
    # otherwise the preferred images are held out first, as many as the share allows per source
    prefer = [i in (0, 1, 2, 11) for i in range(15)]
    train2, held2 = split_holdout(labels, 0.2, seed=4, prefer=prefer)
    assert sorted(train2 + held2) == list(range(15))
    assert {i for i in held2 if labels[i] == "a"} <= {0, 1, 2} and len([i for i in held2 if labels[i] == "a"]) == 2
    assert [i for i in held2 if labels[i] == "b"] == [11]


def test_tiles_are_disjoint_and_start_at_the_centre(rng):
    image = rng.integers(0, 256, (256, 384, 3), dtype=np.uint8)
    views = tile_views(image, 128, 4)
    assert len(views) == 4 and all(v.shape == (128, 128, 3) for v in views)
    assert len({v.tobytes() for v in views}) == 4
    assert tile_views(image[:100, :100], 128, 4)[0].shape == (100, 100, 3)


def test_a_fixed_threshold_replaces_the_calibrated_ones_for_every_format():
    """The paper's hand-set 0.85 on the similarity to the real prototype, as a workspace setting."""
    from dataclasses import asdict

    from lida_core.workspace import WorkspaceConfig, WorkspaceError

    prototype = unit([1, 0, 0])[0]
    decider = Decider(prototype, real_threshold=0.5, unknown_threshold=None, jpeg_threshold=0.4, jpeg_thresholds={90: 0.3})
    config = WorkspaceConfig(profile="paper", fingerprint="b3-scale-full-resize256", real_threshold=0.85, k=3)
    fixed = decider.configured(config)
    assert fixed.threshold(jpeg=False) == fixed.threshold(jpeg=True) == fixed.threshold(jpeg=True, quality=90) == 0.85
    assert fixed.k == 3
    query = unit([0.8, 0.6, 0])  # cosine 0.8 to the real prototype
    gallery, labels = unit([0, 1, 0], [1, 0, 0]), ["g1", "real"]
    assert fixed.decide(query, gallery, labels)[0]["is_generated"]
    assert not decider.configured(replace(config, real_threshold=None)).decide(query, gallery, labels, [True])[0]["is_generated"]
    assert decider.configured(replace(config, real_threshold=None)).threshold(jpeg=True) == 0.4
    for bad in ("high", float("nan"), True):
        with pytest.raises(WorkspaceError, match="real_threshold"):
            WorkspaceConfig.from_dict({**asdict(config), "real_threshold": bad})


def test_holdout_zero_trains_on_every_shot_as_the_paper_does():
    from lida_core.training import split_holdout

    labels = ["real"] * 5 + ["g1"] * 5 + ["g2"] * 2
    train, held = split_holdout(labels, 0.0, seed=3)
    assert held == [] and train == list(range(12))
    train, held = split_holdout(labels, 0.2, seed=3)
    assert sorted(labels[i] for i in held) == ["g1", "real"] and len(train) == 10  # 5-shot trains on 4; 2 images keep both


def test_unknown_clusters_are_the_connected_groups_above_the_threshold():
    from lida_core.decide import unknown_clusters

    e = unit([1, 0, 0], [0.99, 0.14, 0], [0.97, 0.24, 0], [0, 1, 0], [0, 0.99, 0.1], [0, 0, 1])
    # 0-1 and 1-2 are linked (0-2 is not needed: linking is transitive); 3-4 linked; 5 alone
    assert unknown_clusters(e, 0.98, min_size=2, block=2) == [[0, 1, 2], [3, 4]]
    assert unknown_clusters(e, 0.98, min_size=3) == [[0, 1, 2]]
    assert unknown_clusters(e, 1.01) == []


def test_holdout_folds_hold_out_every_image_once_and_keep_each_source_trainable():
    """The closed-form promotion gate's folds: split_holdout's size, every image of a 3+ source held out once."""
    from lida_core.training import holdout_folds, split_holdout

    labels = ["real"] * 5 + ["gan"] * 5 + ["pair"] * 2 + ["big"] * 11
    folds = holdout_folds(labels, 0.2, seed=4)
    held = [i for _, fold in folds for i in fold]
    assert sorted(held) == [i for i, s in enumerate(labels) if s != "pair"]  # each once; a 2-image source never
    for train, fold in folds:
        assert sorted(train + fold) == list(range(len(labels))) and not set(train) & set(fold)
        assert {labels[i] for i in train} == set(labels)  # every source keeps an image to train on
    first = folds[0][1]
    assert sorted(labels[i] for i in first) == sorted(labels[i] for i in split_holdout(labels, 0.2, seed=4)[1])
    assert holdout_folds(labels, 0.0, seed=4) == []


def test_decisions_scored_as_a_batch_are_those_scored_one_query_at_a_time(rng):
    """`decide` (and a scan's `search_and_decide`) score all queries in one product; each decision must not move."""
    from lida_core.statistical import QuadraticDetector

    real = unit(*(np.array([1.0, 0.0, 0.0, 0.0]) + rng.normal(0, 0.05, (30, 4))))
    generated = unit(*(np.array([1.0, 0.3, 0.0, 0.0]) + rng.normal(0, 0.05, (30, 4))))
    gallery, labels = np.concatenate([real[:5], generated[:5]]), ["real"] * 5 + ["gan"] * 5
    queries = np.concatenate([real[5:], generated[5:]])
    prototype = real_prototype(real[:5])
    quadratic = QuadraticDetector.fit(real[:5], generated[:5], ["gan"] * 5).to_dict()
    for decider in (Decider(prototype, 0.99, None), Decider(prototype, 0.0, None, generators=generated[:1]),
                    Decider(prototype, 0.0, None, quadratic=quadratic)):
        batch = decider.decide(queries, gallery, labels)
        sims = queries @ gallery.T
        for i, decision in enumerate(batch):
            order = np.argsort(-sims[i], kind="stable")
            alone = decider.decide_from_similarities(queries[i], sims[i][order], np.asarray(labels)[order].tolist())
            assert decision["real_score"] == pytest.approx(alone["real_score"], abs=1e-6)
            assert {k: v for k, v in decision.items() if k != "real_score"} == {k: v for k, v in alone.items() if k != "real_score"}
        called = [d["is_generated"] for d in batch]
        assert 0 < sum(called) < len(called)  # the rule decides both ways here, so agreement is not vacuous


def test_a_jpeg_is_judged_by_the_threshold_calibrated_nearest_its_quality():
    """Per-quality JPEG thresholds: the nearest calibrated quality (ties to the higher); the one JPEG threshold otherwise."""
    prototype = unit([1, 0, 0])[0]
    decider = Decider(prototype, real_threshold=0.5, unknown_threshold=None, jpeg_threshold=0.4,
                      jpeg_thresholds={70: 0.1, 80: 0.2, 90: 0.3})
    assert [decider.threshold(jpeg=True, quality=q) for q in (10, 70, 74, 75, 76, 85, 89, 90, 100)] == \
        [0.1, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3]
    assert decider.threshold(jpeg=True) == 0.4 and decider.threshold(jpeg=False, quality=90) == 0.5  # unknown quality; a PNG
    query = unit([0.95, 0.3122499, 0])  # cosine 0.95 ... and one with cosine 0.25 to the real prototype
    low = unit([0.25, 0.9682458, 0])
    gallery, labels = unit([0, 1, 0], [1, 0, 0]), ["g1", "real"]
    called = [d["is_generated"] for d in decider.decide(np.vstack([low, low, low, query]), gallery, labels,
                                                         [True, True, False, True], [70, 90, None, 70])]
    assert called == [False, True, True, False]  # 0.25 against 0.1, 0.3, the PNG threshold 0.5; 0.95 is real anywhere
    again = Decider.from_dict(json.loads(json.dumps(decider.to_dict())))
    assert again.jpeg_thresholds == {70: 0.1, 80: 0.2, 90: 0.3} and again.threshold(jpeg=True, quality=84) == 0.2
    assert Decider.from_dict({**decider.to_dict(), "jpeg_thresholds": None}).threshold(jpeg=True, quality=90) == 0.4


def test_an_image_smaller_than_the_view_takes_its_sides_threshold_never_a_looser_one():
    """Size thresholds: interpolated over log side between the calibrated sides and the full-size threshold, held at
    the smallest side below it, never looser (higher: more flagged) than the full-size one; a JPEG's moved as its
    quality moves the full-size one."""
    prototype = unit([1, 0, 0])[0]
    decider = Decider(prototype, real_threshold=10.0, unknown_threshold=None, jpeg_threshold=20.0,
                      jpeg_thresholds={70: 16.0, 90: 24.0}, size_thresholds={16: -10.0, 64: 0.0, 128: 4.0},
                      jpeg_size_thresholds={64: 5.0}, view_size=256)
    full = decider.threshold()
    assert full == 10.0 and decider.threshold(dims=(256, 256)) == decider.threshold(dims=(4000, 300)) == full
    assert decider.threshold(dims=None) == decider.threshold(dims=(None, 100)) == full  # size unknown
    assert decider.threshold(dims=(64, 64)) == 0.0 and decider.threshold(dims=(8, 8)) == -10.0  # below the smallest: held
    assert decider.threshold(dims=(32, 32)) == pytest.approx(-5.0)  # halfway in log side between 16 and 64
    assert decider.threshold(dims=(64, 1000)) == pytest.approx(4.0)  # a 64 x 256 view: as many pixels as 128 x 128
    assert decider.threshold(dims=(181, 181)) == pytest.approx(4.0 + 6.0 * np.log(181 / 128) / np.log(2))  # towards full
    assert replace(decider, size_thresholds={64: 30.0}).threshold(dims=(64, 64)) == full  # a looser one: never
    # JPEG: 64's 5 moved by the quality's full-size shift from the one JPEG threshold (24 - 20, 16 - 20)
    assert decider.threshold(jpeg=True, quality=90, dims=(64, 64)) == 9.0
    assert decider.threshold(jpeg=True, quality=70, dims=(64, 64)) == 1.0 and decider.threshold(jpeg=True, dims=(64, 64)) == 5.0
    assert decider.threshold(jpeg=True, quality=90, dims=(300, 300)) == 24.0
    # the decisions use each query's dims; a fixed hand-set threshold drops the calibrated ones
    query = unit([0.5, 0.5, 0])  # its score under the contrast-free rule is its cosine to the prototype
    low = replace(decider, real_threshold=0.8, size_thresholds={64: 0.6}, jpeg_size_thresholds=None)
    called = [d["is_generated"] for d in low.decide(np.vstack([query, query]), unit([1, 0, 0]), ["real"], [False, False],
                                                     dims=[(64, 64), (512, 512)])]
    assert called == [False, True]  # cosine 0.707: real against 0.6 at 64 pixels, generated against 0.8 at full size
    from lida_core.workspace import WorkspaceConfig

    fixed = low.configured(WorkspaceConfig(profile="paper", fingerprint="b3-scale-full-resize256", real_threshold=0.85))
    assert fixed.threshold(dims=(64, 64)) == fixed.threshold(jpeg=True, quality=90, dims=(16, 16)) == 0.85
    again = Decider.from_dict(json.loads(json.dumps(decider.to_dict())))
    assert again.size_thresholds == decider.size_thresholds and again.jpeg_size_thresholds == {64: 5.0}
    assert again.view_size == 256 and again.threshold(dims=(32, 32)) == pytest.approx(-5.0)
    old = {k: v for k, v in decider.to_dict().items() if k not in ("size_thresholds", "jpeg_size_thresholds", "view_size")}
    assert Decider.from_dict(old).threshold(dims=(16, 16)) == full  # a decider saved before session 29

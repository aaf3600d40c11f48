"""Metrics against hand-worked examples."""

import numpy as np
import pytest

from lida_core.metrics import auroc, balanced_accuracy, confusion_matrix, per_source_table, retrieval_metrics


def test_rank1_and_map_by_hand():
    gallery = ["a", "b", "a", "c"]
    sim = np.array(
        [
            [0.9, 0.8, 0.1, 0.0],  # query a: ranks a(1) b a(3) c -> AP = (1/1 + 2/3) / 2
            [0.9, 0.8, 0.7, 0.0],  # query b: ranks a b(2) a c     -> AP = 1/2, rank-1 miss
            [0.1, 0.2, 0.3, 0.9],  # query c: c first               -> AP = 1
            [0.5, 0.5, 0.5, 0.5],  # query d: no "d" in the gallery -> skipped
        ]
    )
    result = retrieval_metrics(sim, ["a", "b", "c", "d"], gallery)
    assert result["rank1"] == pytest.approx(2 / 3)
    assert result["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5 + 1) / 3)
    assert result["queries"] == 3 and result["skipped_queries"] == 1
    assert np.isnan(result["ap"][3])


def test_retrieval_ties_keep_gallery_order():
    result = retrieval_metrics(np.array([[0.5, 0.5]]), ["x"], ["y", "x"])
    assert result["rank1"] == 0.0 and result["mAP"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((2, 2)), ["a"], ["a", "b"])


def test_balanced_accuracy_by_hand():
    truth = [False, False, False, False, True, True]
    pred = [False, False, False, True, True, False]
    assert balanced_accuracy(truth, pred) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert balanced_accuracy([True, True], [True, False]) == pytest.approx(0.5)


def test_auroc_by_hand_with_ties():
    # positives 0.8, 0.4; negatives 0.4, 0.1 -> pairs: (0.8>0.4) (0.8>0.1) (0.4=0.4 half) (0.4>0.1)
    assert auroc([0.8, 0.4, 0.4, 0.1], [True, True, False, False]) == pytest.approx(3.5 / 4)
    assert auroc([0.1, 0.9], [True, False]) == 0.0
    assert np.isnan(auroc([0.1, 0.2], [True, True]))


def test_confusion_matrix_and_per_source_table():
    truth = ["real", "real", "g1", "g1", "g2"]
    pred = ["real", "g1", "g1", "unknown", "g2"]
    names, matrix = confusion_matrix(truth, pred)
    assert names == ["g1", "g2", "real", "unknown"]
    assert matrix.tolist() == [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    rows = {row["source"]: row for row in per_source_table(truth, pred)}
    assert set(rows) == {"g1", "g2", "real"}
    assert rows["g1"]["recall"] == 0.5 and rows["g1"]["precision"] == 0.5
    assert rows["real"]["recall"] == 0.5 and rows["real"]["precision"] == 1.0

"""Centre loss (Wen et al.) and the real-prototype loss, checked by hand on tiny tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from lida_core.losses import CenterLoss, LidaLoss, RealPrototypeLoss


def test_center_loss_value_and_gradient_by_hand():
    loss = CenterLoss(num_classes=2, dim=2, alpha=0.5)
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    value = loss(x, y)
    # 1/2 * mean(||(1,0)||^2, ||(0,2)||^2, ||(2,0)||^2) = 1/2 * (1 + 4 + 4) / 3
    assert float(value.detach()) == pytest.approx(1.5)
    value.backward()
    # d/dx_i = (x_i - c_{y_i}) / N
    expected = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0]]) / 3
    assert torch.allclose(x.grad, expected)
    assert not any(p.requires_grad for p in loss.parameters())  # centres are not optimised


def test_center_update_follows_wen_et_al():
    loss = CenterLoss(num_classes=3, dim=2, alpha=0.5)
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    loss.update_centers(x, torch.tensor([0, 0, 1]))
    # class 0: delta = ((0,0)-(1,0) + (0,0)-(0,2)) / (1 + 2) = (-1/3, -2/3); c -= 0.5 * delta
    assert torch.allclose(loss.centers[0], torch.tensor([1 / 6, 1 / 3]))
    # class 1: delta = ((1,1)-(3,1)) / 2 = (-1, 0)
    assert torch.allclose(loss.centers[1], torch.tensor([1.5, 1.0]))
    assert torch.equal(loss.centers[2], torch.tensor([5.0, 5.0]))  # absent class unchanged


def test_center_loss_refuses_bad_rates():
    with pytest.raises(ValueError):
        CenterLoss(2, 2, alpha=0.0)


def test_prototype_loss_by_hand_and_direction():
    proto = torch.tensor([1.0, 0.0])
    x = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    is_real = torch.tensor([1, 0])
    tau = 0.5
    value = RealPrototypeLoss(tau)(x, is_real, proto)
    cos = torch.tensor([1 / math.sqrt(2), 0.0])
    expected = -(math.log(torch.sigmoid(cos[0] / tau)) + math.log(1 - torch.sigmoid(cos[1] / tau))) / 2
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.backward()
    # one small step along -grad pulls the real image towards the prototype, pushes the fake away
    stepped = x.detach() - 0.1 * x.grad
    before = F.cosine_similarity(x.detach(), proto[None], dim=1)
    after = F.cosine_similarity(stepped, proto[None], dim=1)
    assert after[0] > before[0] and after[1] < before[1]


def test_lida_loss_is_center_plus_lambda_prototype_plus_softmax_partner():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    is_real = (labels == 0).long()
    proto = features[:2].mean(0)
    combined = LidaLoss(num_classes=3, dim=4)
    combined.center.init_centers(features, labels)
    assert combined.lam == 0.9
    total, parts = combined(features, labels, is_real, proto)
    center = float(combined.center(features, labels))
    prototype = float(combined.prototype(features, is_real, proto))
    centers = F.normalize(combined.center.centers, dim=1)
    logits = features @ centers.t() / 0.1  # features are unit length already
    softmax = float(-torch.log_softmax(logits, 1)[torch.arange(6), labels].mean())
    assert float(total) == pytest.approx(center + 0.9 * prototype + softmax, rel=1e-5)
    assert parts["softmax"] == pytest.approx(softmax, rel=1e-5)
    paper_total, paper_parts = LidaLoss(num_classes=3, dim=4, beta=0.0)(features, labels, is_real, proto)
    assert "softmax" not in paper_parts
    # centres start at zero here, so the paper's terms are centre (from the origin) + 0.9 x prototype
    assert float(paper_total) == pytest.approx(0.5 + 0.9 * prototype, rel=1e-5)

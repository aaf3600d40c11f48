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


def test_paper_objective_is_the_papers_formula_on_a_hand_computed_batch():
    """4 real / 28 generated (the issue's batch): L_A summed, L_D averaged per side, no cross-entropy."""
    torch.manual_seed(3)
    features = F.normalize(torch.randn(32, 8), dim=1)
    labels = torch.tensor([0] * 4 + [1] * 14 + [2] * 14)
    is_real = (labels == 0).long()
    proto = F.normalize(torch.randn(8), dim=0)
    tau = 0.1
    loss = LidaLoss(num_classes=3, dim=8, tau=tau, beta=0.0, form="paper")
    loss.center.init_centers(features, labels)
    total, parts = loss(features, labels, is_real, proto)
    # restated with plain floats
    rows = features.tolist()
    centres = loss.center.centers.tolist()
    p = proto.tolist()
    l_a = sum(sum((a - b) ** 2 for a, b in zip(rows[i], centres[labels[i]], strict=True)) for i in range(32))
    s = [sum(a * b for a, b in zip(r, p, strict=True)) / tau for r in rows]  # unit vectors: the dot product is the cosine
    sig = [1 / (1 + math.exp(-v)) for v in s]
    l_d = -sum(math.log(sig[i]) for i in range(4)) / 4 - sum(math.log(1 - sig[i]) for i in range(4, 32)) / 28
    assert parts["center"] == pytest.approx(l_a, rel=1e-5)
    assert parts["prototype"] == pytest.approx(l_d, rel=1e-5)
    assert float(total) == pytest.approx(l_a + 0.9 * l_d, rel=1e-5)
    assert "softmax" not in parts
    # the batch-mean form weighs the 28 generated images 7 times the 4 real ones: not the same number
    assert float(RealPrototypeLoss(tau)(features, is_real, proto)) != pytest.approx(l_d, rel=1e-3)
    # a batch without real images: the real side adds nothing
    gen_only = RealPrototypeLoss(tau, balanced=True)(features[4:], is_real[4:], proto)
    assert float(gen_only) == pytest.approx(-sum(math.log(1 - sig[i]) for i in range(4, 32)) / 28, rel=1e-5)
    with pytest.raises(ValueError, match="no cross-entropy"):
        LidaLoss(num_classes=3, dim=8, beta=1.0, form="paper")


def test_paper_profile_adapts_with_the_papers_objective_and_prototype():
    from lida_core.lifecycle import adapt_config

    paper = adapt_config("paper", None, None, 0, "fingerprint")
    assert (paper.loss, paper.beta, paper.lam, paper.prototype) == ("paper", 0.0, 0.9, "pretraining")
    assert (paper.epochs, paper.batch_size, paper.lr) == (100, 32, 1e-4)
    small = adapt_config("small", None, None, 0, "fingerprint")
    assert (small.loss, small.prototype) == ("project", "gallery")


def test_adaptation_with_the_pretraining_prototype_needs_one_and_holds_it_fixed():
    import numpy as np

    from lida_core import training
    from lida_core.model import build_model

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    labels = ["real", "real", "real", "gen", "gen", "gen"]
    config = training.AdaptConfig(epochs=1, batch_size=6, holdout=0.0, views_per_image=1, beta=0.0, loss="paper",
                                  prototype="pretraining")
    with pytest.raises(ValueError, match="pre-training prototype"):
        training.adapt(build_model("small"), images, labels, config)
    torch.manual_seed(0)
    seen = []
    original = RealPrototypeLoss.forward

    def spy(self, features, is_real, prototype):
        seen.append(prototype.detach().clone())
        return original(self, features, is_real, prototype)

    fixed = F.normalize(torch.randn(256), dim=0).numpy()
    RealPrototypeLoss.forward = spy
    try:
        training.adapt(build_model("small"), images, labels, config, pretraining_prototype=fixed)
    finally:
        RealPrototypeLoss.forward = original
    assert seen and all(np.allclose(p.numpy(), fixed) for p in seen)

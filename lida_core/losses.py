"""Few-shot adaptation losses: centre loss over sources + lambda x real-prototype loss.

Both take L2-normalised features (the retrieval space is cosine) and integer labels. Two forms
(`LidaLoss(form=...)`):
- "paper", the paper's objective exactly (`../shared/reference/lida-method.md`): L_A the sum
  over the batch of ||x_i - c_{y_i}||^2, L_D the class-balanced real-prototype loss
  -(1/N_r) sum_real log s(x) - (1/N_f) sum_generated log(1 - s(x)), L = L_A + 0.9 L_D, no
  cross-entropy;
- "project", what the CPU network profiles train with: half the mean centre distance, one
  binary cross-entropy mean over the batch, plus `beta` x a softmax over the centres.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CenterLoss(nn.Module):
    """Wen et al. (2016): L = 1/2 * mean_i ||x_i - c_{y_i}||^2, centres updated at rate alpha.

    The centres are a buffer, not a parameter: the optimiser never touches them. After each
    step `update_centers` moves centre j by alpha * sum_{i: y_i=j} (c_j - x_i) / (1 + n_j),
    the paper's update rule (eq. 4).
    """

    def __init__(self, num_classes: int, dim: int, alpha: float = 0.5):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError("CenterLoss needs at least one class and one dimension")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.register_buffer("centers", torch.zeros(num_classes, dim))

    def init_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Start each centre at the mean of its class (instead of the origin)."""
        with torch.no_grad():
            for j in labels.unique():
                self.centers[j] = features[labels == j].mean(0)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, reduction: str = "half-mean") -> torch.Tensor:
        """1/2 mean_i ||x_i - c_{y_i}||^2 ("half-mean", Wen et al.), or the paper's sum over the batch ("sum")."""
        distances = (features - self.centers[labels]).pow(2).sum(1)
        return distances.sum() if reduction == "sum" else 0.5 * distances.mean()

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        features = features.detach()
        delta = torch.zeros_like(self.centers)
        counts = torch.zeros(self.centers.shape[0], device=features.device)
        delta.index_add_(0, labels, self.centers[labels] - features)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
        self.centers -= self.alpha * delta / (1.0 + counts[:, None])


class RealPrototypeLoss(nn.Module):
    """Binary cross-entropy of sigmoid(cos(x, p_real) / tau) against "is real".

    Real images are pulled towards the mean real feature, generated ones pushed away, so
    that similarity to the prototype is the detection score. `balanced` (the paper's L_D)
    averages the real and the generated terms each over their own count and adds them (a side
    absent from the batch adds 0); otherwise one mean over the batch.
    """

    def __init__(self, tau: float = 0.1, balanced: bool = False):
        super().__init__()
        if tau <= 0:
            raise ValueError("tau must be positive")
        self.tau, self.balanced = tau, balanced

    def forward(self, features: torch.Tensor, is_real: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        logits = F.cosine_similarity(features, prototype.reshape(1, -1).to(features), dim=1) / self.tau
        target = is_real.to(logits.dtype)
        if not self.balanced:
            return F.binary_cross_entropy_with_logits(logits, target)
        terms = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        real = target > 0.5
        return sum((terms[side].mean() if side.any() else terms.sum() * 0) for side in (real, ~real))


def center_softmax(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy over cosine similarities to the class centres (centres held fixed).

    Centre loss alone only pulls each class together; collapsing every class onto one point
    minimises it. Wen et al. always pair it with a softmax term that pushes classes apart;
    this is that term, written on the same centres so it agrees with retrieval by cosine.
    """
    logits = F.normalize(features, dim=1) @ F.normalize(centers.detach(), dim=1).t() / tau
    return F.cross_entropy(logits, labels)


LOSS_FORMS = ("paper", "project")


class LidaLoss(nn.Module):
    """The adaptation objective: centre loss + lam * real-prototype loss (lam = 0.9).

    form "paper": the paper's terms exactly and nothing else (`beta` must be 0); form "project":
    the half-mean centre loss, the batch-mean prototype loss and `beta` x the centres' softmax
    partner (the module docstring).
    """

    def __init__(
        self, num_classes: int, dim: int, lam: float = 0.9, alpha: float = 0.5, tau: float = 0.1, beta: float = 1.0,
        form: str = "project",
    ):
        super().__init__()
        if form not in LOSS_FORMS:
            raise ValueError(f"unknown loss form {form!r}; choose from {', '.join(LOSS_FORMS)}")
        if form == "paper" and beta:
            raise ValueError("the paper's objective has no cross-entropy term: beta must be 0 with form 'paper'")
        self.center = CenterLoss(num_classes, dim, alpha)
        self.prototype = RealPrototypeLoss(tau, balanced=form == "paper")
        self.lam = lam
        self.beta = beta
        self.tau = tau
        self.form = form

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, is_real: torch.Tensor, prototype: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        center = self.center(features, labels, "sum" if self.form == "paper" else "half-mean")
        proto = self.prototype(features, is_real, prototype)
        total = center + self.lam * proto
        parts = {"center": float(center.detach()), "prototype": float(proto.detach())}
        if self.beta:
            softmax = center_softmax(features, labels, self.center.centers, self.tau)
            total = total + self.beta * softmax
            parts["softmax"] = float(softmax.detach())
        parts["total"] = float(total.detach())
        return total, parts

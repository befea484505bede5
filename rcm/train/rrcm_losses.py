"""rRCM's losses (Lei et al. 2025), each a module whose ``forward`` returns a scalar.

Pretraining: InfoNCE on cosine similarity with the other batch images as negatives, used twice --
between two augmented views at s_min (L_con, against an EMA target) and between temporally adjacent
points of one noise trajectory (L_cons, against the online network under stop-gradient).
Fine-tuning: consistency regularisation of Jeong & Shin 2020 over m noise draws per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCE(nn.Module):
    """l(q, k) = mean_i -log softmax_j(cos(q_i, k_j) / tau)[i]; q, k (B, D); positives on the diagonal.

    With all similarities equal (e.g. orthogonal features) it is exactly log B.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, B) cosine similarities over tau; row i scores query i against every key."""
        return F.normalize(q.flatten(1), dim=1) @ F.normalize(k.flatten(1), dim=1).T / self.temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """q (b, D) against k (B, D), B >= b: query i's positive is key offset + i, every other key a
        negative (data parallel: k holds every process's keys and offset is this process's first row)."""
        with torch.autocast(q.device.type, enabled=False):  # similarities / tau in float32 under any amp
            logits = self.logits(q.float(), k.float())
            return F.cross_entropy(logits, offset + torch.arange(len(logits), device=logits.device))


class ContrastiveLoss(nn.Module):
    """L_con = l(z_theta(v1), sg z_xi(v2)) + l(z_theta(v2), sg z_xi(v1)), z_xi from the EMA target."""

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.nce = InfoNCE(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, target1: torch.Tensor,
                target2: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.nce(z1, target2.detach(), offset) + self.nce(z2, target1.detach(), offset)


class ConsistencyLoss(nn.Module):
    """L_cons = l(h_theta(x + s_n eps, s_n), sg h_theta(x + s_{n+1} eps, s_{n+1})).

    The target is the *online* network's representation of the less noisy neighbour, detached.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.nce = InfoNCE(temperature)

    def forward(self, h_noisier: torch.Tensor, h_cleaner: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.nce(h_noisier, h_cleaner.detach(), offset)


class ConsistencyRegularization(nn.Module):
    """Fine-tuning loss over m noise draws per image (Jeong & Shin 2020, as rRCM uses it):

        CE (mean over draws and images) + lam * mean_i (1/m) sum_j KL(pbar_i || p_ij) + eta * mean_i H(pbar_i)

    with p_ij = softmax(logits[j, i]) and pbar_i = mean_j p_ij; for m = 2, (1/m) sum_j = 1/2 sum_j.
    """

    def __init__(self, lam: float, eta: float = 0.5):
        super().__init__()
        self.lam, self.eta = lam, eta

    def terms(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """logits (m, B, K), labels (B,) -> {'ce', 'kl', 'entropy'} scalars (unweighted)."""
        m, b, k = logits.shape
        logp = F.log_softmax(logits.float(), dim=2)                              # (m, B, K)
        ce = F.nll_loss(logp.reshape(m * b, k), labels.repeat(m))
        pbar = logp.exp().mean(0)                                                # (B, K)
        log_pbar = torch.log(pbar.clamp_min(1e-20))
        kl = (pbar[None] * (log_pbar[None] - logp)).sum(2).mean(0)                # (B,) KL(pbar || p_j)
        entropy = -(pbar * log_pbar).sum(1)                                      # (B,)
        return {"ce": ce, "kl": kl.mean(), "entropy": entropy.mean()}

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The total loss from ``terms``' output."""
        return terms["ce"] + self.lam * terms["kl"] + self.eta * terms["entropy"]

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.weighted(self.terms(logits, labels))

"""The dynamic branch: from a pooled input to the coefficients Lambda(x) and Phi(x) (Section 3.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import Gate, gate


class DynamicBranch(nn.Module):
    """FC -> activation -> two linear heads: channel attention Lambda and fusion Phi.

    With `squeeze_excite=False` (the paper) the activation is a ReLU; with `True` (the official
    release) it is a small squeeze-and-excitation gate, h * g(W h) with g = relu6(. + 3) / 3. No biases, so the
    paper formulation has exactly (C_in + C_out + L^2) * hidden parameters here.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        attention_size: int,
        fusion_size: int,
        gate_kind: Gate = "sigmoid",
        squeeze_excite: bool = False,
    ) -> None:
        super().__init__()
        self.gate_kind = gate_kind
        self.fc = nn.Linear(in_features, hidden, bias=False)
        self.se = nn.Linear(hidden, hidden, bias=False) if squeeze_excite else None
        self.attention = nn.Linear(hidden, attention_size, bias=False) if attention_size else None
        self.fusion = nn.Linear(hidden, fusion_size, bias=False) if fusion_size else None

    def hidden(self, pooled: Tensor) -> Tensor:
        """The branch's hidden features (N, hidden): FC, then ReLU or the squeeze-and-excitation gate."""
        hidden = self.fc(pooled)
        if self.se is None:
            return torch.relu(hidden)
        return hidden * gate(self.se(hidden), "hard_sigmoid")

    def forward(self, pooled: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Return (Lambda as (N, C_out) or None, flat Phi as (N, fusion_size) or None)."""
        hidden = self.hidden(pooled)
        lam = gate(self.attention(hidden), self.gate_kind) if self.attention is not None else None
        phi = self.fusion(hidden) if self.fusion is not None else None
        return lam, phi

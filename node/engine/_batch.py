"""`Batch`: what every chain passes through its blocks, in a module of its own so that the coordinator's
side (its chains, the client) can name it without importing transformers' blocks (~3 s at start-up)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Hidden states of a left-padded batch and its token mask (1 = real token)."""

    hidden: torch.Tensor  # [batch, length, hidden]
    mask: torch.Tensor  # [batch, length]

"""The serialisable record of a pruning decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PrunePlan:
    pruner: str
    # Structured: conv module name -> indices of its output channels (filters) to remove.
    removed_channels: dict[str, list[int]] = field(default_factory=dict)
    # Unstructured: module name -> boolean keep-mask with the shape of that module's weight.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """Plain tensors/lists/strings only, so `torch.load(weights_only=True)` can read it."""
        return {
            "pruner": self.pruner,
            "removed_channels": {k: list(map(int, v)) for k, v in self.removed_channels.items()},
            "masks": {k: v.to(torch.bool).cpu() for k, v in self.masks.items()},
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> PrunePlan:
        return cls(
            pruner=payload["pruner"],
            removed_channels={k: list(v) for k, v in payload["removed_channels"].items()},
            masks=dict(payload["masks"]),
        )

"""`l2_filter`: filters scored by the L2 norm of their weights, the lowest removed."""

from collections.abc import Sequence

import torch
from torch import nn


def l2_importance(
    model: nn.Module, names: Sequence[str], _batches: object = None, _seed: int = 0
) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().flatten(1).norm(dim=1).double().cpu() for n in names}

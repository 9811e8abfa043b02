"""Training recipes: the pre-training run that every retraining schedule is defined against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Recipe(BaseModel):
    """SGD recipe of a pre-training run (and, via the schedules, of every retraining run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(gt=0)
    lr: float = Field(gt=0)
    milestones: tuple[int, ...]  # epochs at which the lr is multiplied by `gamma`
    gamma: float = Field(default=0.1, gt=0, le=1)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    # The paper's Table 6 says Nesterov SGD; the authors' code uses plain momentum SGD.
    nesterov: bool = True
    weight_decay: float = Field(default=1e-4, ge=0)
    # The GLOBAL batch of one optimizer step: N DDP workers take batch_size / N each.
    batch_size: int = Field(default=64, gt=0)
    # Share of a retraining budget spent warming up in `slr` and `clr`.
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _milestones_inside_run(self) -> Recipe:
        if list(self.milestones) != sorted(self.milestones) or any(
            not 0 < m < self.epochs for m in self.milestones
        ):
            raise ValueError(
                f"milestones {list(self.milestones)} must be increasing and inside "
                f"(0, {self.epochs})"
            )
        return self

    def lr_at_epoch(self, epoch: int) -> float:
        """Learning rate of pre-training epoch `epoch` (0-based), step decay at the milestones."""
        drops = sum(1 for m in self.milestones if epoch >= m)
        return self.lr * self.gamma**drops

    @property
    def final_lr(self) -> float:
        return self.lr_at_epoch(self.epochs - 1)

    @property
    def milestone_fractions(self) -> tuple[float, ...]:
        return tuple(m / self.epochs for m in self.milestones)


DEFAULT_RECIPES: dict[str, Recipe] = {
    # He et al. / PFEC / Le & Hua CIFAR recipe (Table 6; norm-pruning/cifar/l1-norm-pruning/
    # main.py): SGD momentum 0.9, wd 1e-4, batch 64, lr 0.1 /10 at epochs 80 and 120.
    "cifar10": Recipe(epochs=160, lr=0.1, milestones=(80, 120), batch_size=64),
    "cifar100": Recipe(epochs=160, lr=0.1, milestones=(80, 120), batch_size=64),
    # ImageNet (torchvision reference / the authors' imagenet code): global batch 256, lr 0.1,
    # 90 epochs, /10 at 30 and 60, wd 1e-4.
    "imagenet": Recipe(epochs=90, lr=0.1, milestones=(30, 60), batch_size=256),
    # nptm's own short recipe: a ResNet-20 converges on the 1,437 training digits in well
    # under a minute.
    "digits": Recipe(epochs=30, lr=0.1, milestones=(15, 23), batch_size=64, weight_decay=5e-4),
}


def default_recipe(dataset: str, **overrides: object) -> Recipe:
    """The dataset's default recipe with `overrides` applied (validated)."""
    base = DEFAULT_RECIPES[dataset].model_dump()
    base.update(overrides)
    return Recipe.model_validate(base)

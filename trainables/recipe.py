"""Training recipes: the pre-training run that every retraining schedule is defined against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# What one run can survive: a grid is refused past these (nptm.search_spaces.checks). Every
# epoch is a row in the tables and a slice of each per-step lr curve the stage computes, and
# the data order's seed is `seed * 2**20 + epoch` (nptm.trainables.loaders), so an epoch count
# stays well below 2**20.
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536  # the global batch of one step
MAX_LR = 1e6  # SGD's learning rate: a divergent one is recorded as diverged; this keeps it finite
MAX_WEIGHT_DECAY = 1.0
MAX_MILESTONES = 100
# Optimizer steps of one run (epochs x steps per epoch): the stage holds each per-step lr (and
# momentum) curve as an array of that many floats, 400 MB at this bound.
MAX_STEPS = 50_000_000


class Recipe(BaseModel):
    """SGD recipe of a pre-training run (and, via the schedules, of every retraining run)."""

    # Finite numbers only: an infinite or NaN lr would train nothing but NaNs.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epochs: int = Field(gt=0, le=MAX_EPOCHS)
    lr: float = Field(gt=0, le=MAX_LR)
    # epochs at which the lr is multiplied by `gamma`
    milestones: tuple[int, ...] = Field(max_length=MAX_MILESTONES)
    gamma: float = Field(default=0.1, gt=0, le=1)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    # The paper's Table 6 says Nesterov SGD; the authors' code uses plain momentum SGD.
    nesterov: bool = True
    weight_decay: float = Field(default=1e-4, ge=0, le=MAX_WEIGHT_DECAY)
    # The GLOBAL batch of one optimizer step: N DDP workers take batch_size / N each.
    batch_size: int = Field(default=64, gt=0, le=MAX_BATCH_SIZE)
    # Share of a retraining budget spent warming up in `slr` and `clr`.
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)

    @field_validator("lr", "gamma", "momentum", "weight_decay", "warmup_fraction")
    @classmethod
    def _no_negative_zero(cls, value: float) -> float:
        """-0.0 is 0.0: a recipe's identity (a stage id hashes it) must not tell them apart."""
        return value + 0.0

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
    def uses_nesterov(self) -> bool:
        """Whether SGD runs with Nesterov momentum: `nesterov`, where there is momentum (torch
        refuses Nesterov without it)."""
        return self.nesterov and self.momentum > 0

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

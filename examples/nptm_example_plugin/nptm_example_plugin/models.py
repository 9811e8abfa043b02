"""`tiny_cnn`: three conv-BN-ReLU layers, global average pooling, one linear classifier."""

from torch import nn


class TinyCNN(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )


def build_tiny_cnn(_info: object, in_channels: int, num_classes: int) -> nn.Module:
    return TinyCNN(in_channels, num_classes)


def prunable_convs(model: nn.Module) -> list[str]:
    # No residual connections: every conv's filters can go (the next layer shrinks with them).
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]

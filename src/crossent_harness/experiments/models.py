"""Small classifiers for the harness: logistic regression, MLP, and the CNNs of the published protocols."""

from __future__ import annotations

import math

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
#: ``default``: PyTorch's own Linear initialisation; ``xavier``: Glorot & Bengio's uniform weights, zero biases.
INITS = ("default", "xavier")


def _flat_size(shape) -> int:
    return math.prod(shape)


class MLP(nn.Module):
    """``Linear -> act`` for each width in ``hidden``, then a linear head (logistic regression if empty).

    With ``residual=True`` a hidden layer whose width equals the previous one adds its input back,
    ``h <- h + act(W h)``, as the MNIST-1D reference MLP does for its second layer. ``init="xavier"``
    draws every weight from Glorot & Bengio's uniform distribution and zeroes the biases.
    """

    def __init__(self, in_features: int, hidden, num_classes: int, activation: str = "relu", residual: bool = False,
                 init: str = "default"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; use one of {INITS}")
        self.act = ACTIVATIONS[activation]()
        self.hidden = nn.ModuleList()
        self.skip: list[bool] = []
        width = in_features
        for h in hidden:
            self.hidden.append(nn.Linear(width, int(h)))
            self.skip.append(residual and width == int(h))
            width = int(h)
        self.head = nn.Linear(width, num_classes)
        if init == "xavier":
            for layer in [*self.hidden, self.head]:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x):
        h = x.flatten(1)
        for layer, skip in zip(self.hidden, self.skip):
            h = h + self.act(layer(h)) if skip else self.act(layer(h))
        return self.head(h)


def mlp(in_features: int, hidden, num_classes: int, activation: str = "relu", residual: bool = False,
        init: str = "default") -> MLP:
    return MLP(in_features, hidden, num_classes, activation, residual, init)


class MNIST1DConv(nn.Module):
    """MNIST-1D's CNN: three Conv1d with 25 channels (k5 s2 p1, k3 s2 p1, k3 s2 p1), ReLU, then a linear
    head on the flattened features (125 for length-40 signals)."""

    def __init__(self, length: int = 40, num_classes: int = 10, channels: int = 25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        self.head = nn.Linear(channels * out, num_classes)

    def forward(self, x):
        return self.head(self.features(x.reshape(x.shape[0], 1, -1)))


def image_cnn(in_channels: int, num_classes: int) -> nn.Sequential:
    """The APL protocol's MNIST-like CNN: Conv32-pool-Conv64-pool-FC128(BN)-FC (28x28 inputs)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


MODELS = ("linear", "mlp", "cnn")


def build_model(
    name: str, input_shape, num_classes: int, *, hidden=(100, 100), activation: str = "relu", residual: bool = False,
    init: str = "default",
) -> nn.Module:
    """``linear``, ``mlp`` (widths ``hidden``) or ``cnn`` (1-D for signals, 2-D for 28x28 images)."""
    if name == "linear":
        return mlp(_flat_size(input_shape), (), num_classes, init=init)
    if name == "mlp":
        return mlp(_flat_size(input_shape), hidden, num_classes, activation, residual, init)
    if name == "cnn":
        if len(input_shape) == 1:
            return MNIST1DConv(input_shape[0], num_classes)
        if len(input_shape) == 3 and tuple(input_shape[1:]) == (28, 28):
            return image_cnn(input_shape[0], num_classes)
        raise ValueError(f"no CNN for inputs of shape {tuple(input_shape)} (1-D signals or 28x28 images)")
    raise ValueError(f"unknown model {name!r}; use one of {MODELS}")

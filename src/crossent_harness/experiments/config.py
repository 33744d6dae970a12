"""The settings of one ``crossent compare`` grid, and the error that names the option behind a bad one.

:mod:`.options` builds a :class:`CompareConfig` from the command line and :mod:`.compare` runs it; both
report a setting that cannot run as an :class:`OptionError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .methods import Method
from .train import TrainConfig


class OptionError(ValueError):
    """A bad command-line option: ``option`` names it, the message says what is wrong."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclass
class CompareConfig:
    """One grid: the dataset and its layout, the methods, the model, the label noise, the seeds, training."""

    dataset: str = "digits"
    methods: list[Method] = field(default_factory=lambda: [Method("ce", "ce")])
    model: str = "mlp"
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    residual: bool = False
    init: str = "default"  # default | xavier (see models.INITS)
    split: str = "default"  # default | random:N (see layout)
    scaling: str | None = None  # None: the dataset's own; standard | minmax
    noise: str = "none"  # none, or a name of noise.MODELS
    noise_rates: tuple[float, ...] = (0.0,)
    imbalance: float | None = None
    train_size: int | None = None
    seeds: tuple[int, ...] = (0,)
    calibrate: bool = False
    val_fraction: float = 0.1
    n_bins: int = 15
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["methods"] = [m.label for m in self.methods]
        return d

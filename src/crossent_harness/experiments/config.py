"""The settings of one ``crossent compare`` grid, and the error that names the option behind a bad one.

:mod:`.options` builds a :class:`CompareConfig` from the command line and :mod:`.compare` runs it; both
report a setting that cannot run as an :class:`OptionError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import datasets, noise
from .methods import Method
from .models import build_model
from .train import TrainConfig


#: The largest seed of a run (32 bits: a run seeds its generators with it plus small offsets).
MAX_SEED = 2**32 - 1


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

    def check(self) -> None:
        """:class:`OptionError` for the first setting that cannot run, from all that is known without the data.

        That is every setting: the methods, the training, the noise definition (its rates, and whether it
        applies to the dataset's number of classes) and the model on the dataset's inputs, both read from
        :data:`.datasets.PROFILES`. Only the noise definition on the training labels themselves waits for
        the loaded data (:func:`.compare.check_data`).
        """
        profile = as_option("--dataset", datasets.profile, self.dataset)
        if self.imbalance is not None and not (math.isfinite(self.imbalance) and self.imbalance >= 1):
            raise OptionError("--imbalance", f"must be a finite number >= 1, got {self.imbalance:g}")
        if self.train_size is not None and self.train_size < 1:
            raise OptionError("--train-size", f"must be >= 1, got {self.train_size}")
        if not 0 < self.val_fraction < 1:
            raise OptionError("--val-fraction", f"must be in (0, 1), got {self.val_fraction:g}")
        if not self.seeds or not all(0 <= s <= MAX_SEED for s in self.seeds):
            raise OptionError("--seed", f"seeds must be in [0, {MAX_SEED}], got {list(self.seeds)}")
        for m in self.methods:
            as_option("--losses", m.check)
            if m.needs_noise and self.noise == "none":
                raise OptionError("--losses",
                                  f"{m.label} needs label noise (--noise) to know the true transition matrix")
            if m.name == "oko" and m.hparams.get("k", 1) >= profile.num_classes:
                raise OptionError("--losses", f"{m.label}: k + 1 distinct classes a set, but {self.dataset} has "
                                  f"{profile.num_classes}")
        as_option("--train", self.train.check)
        if self.noise != "none":
            model = as_option("--noise", noise.get, self.noise)
            for rate in self.noise_rates:
                as_option("--noise-rate", noise.check_rate, rate)
            as_option("--noise", model.check_classes, profile.num_classes)
        as_option("--model", build_model, self.model, profile.input_shape, profile.num_classes, hidden=self.hidden,
                  activation=self.activation, residual=self.residual, init=self.init)


def as_option(option: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a ValueError it raises turned into an :class:`OptionError` naming ``option``."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        if isinstance(e, OptionError):
            raise
        if option == "--train":  # TrainConfig names the setting first: "batch-size must be >= 1"
            option, _, rest = ("--" + str(e)).partition(" ")
            raise OptionError(option, rest) from None
        raise OptionError(option, str(e)) from None

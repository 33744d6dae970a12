"""One training run: a model, a prepared method (loss, class weights, post-hoc adjustment), a config.

Batches are drawn in one of three ways:

- ``sampler="shuffle"``: a fresh random order every epoch;
- ``sampler="ordered"``: every epoch walks the rows in their stored order, the last batch short (the
  LDR-KL reference code's unshuffled data loader);
- ``sampler="cyclic"``: the MNIST-1D reference code's walk, batch ``k`` is rows ``[k*B, (k+1)*B) mod N``
  across epoch boundaries.

The loss is :func:`crossent.cross_entropy` with the method's loss object. A method that trains on sets
(``Prepared.sets``, odd-k-out learning) draws its batches from :class:`crossent.sets.OddKOutSampler`
instead: ``batch_size`` sets a step, the loss :func:`crossent.sets.oko_cross_entropy`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from crossent import cross_entropy
from crossent.sets import OddKOutSampler, oko_cross_entropy, oko_targets

from .metrics import accuracy


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "step", "cosine")
SAMPLERS = ("shuffle", "ordered", "cyclic")


@dataclass
class TrainConfig:
    """Optimisation settings. ``steps`` (if set) overrides ``epochs``; milestones are in epochs."""

    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 20
    steps: int | None = None
    schedule: str = "none"  # none | step (x0.1 at milestones) | cosine (to min_lr)
    milestones: tuple[int, ...] = ()
    min_lr: float = 0.0
    clip: float | None = None
    sampler: str = "shuffle"  # shuffle | ordered | cyclic
    eval_every: int = 0  # steps between test evaluations recorded in the history; 0: end only

    def check(self) -> None:
        """ValueError naming the first setting that cannot train (before any work starts)."""
        for bad, message in self._problems():
            if bad:
                raise ValueError(message())

    def _problems(self):
        # (is it wrong, the message) with lazy messages: a field may be None where it is fine
        yield self.optimizer not in OPTIMIZERS, lambda: f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
        # every real-valued setting is finite first: an infinite rate or decay trains nothing but NaN
        for name in ("lr", "momentum", "weight_decay", "min_lr", "clip"):
            value = getattr(self, name)
            yield value is not None and not math.isfinite(value), lambda name=name, value=value: (
                f"{name.replace('_', '-')} must be a finite number, got {value:g}")
        yield not self.lr > 0, lambda: f"lr must be > 0, got {self.lr:g}"
        yield not 0 <= self.momentum < 1, lambda: f"momentum must be in [0, 1), got {self.momentum:g}"
        yield self.nesterov and not self.momentum > 0, lambda: "nesterov needs momentum > 0"
        yield not self.weight_decay >= 0, lambda: f"weight-decay must be >= 0, got {self.weight_decay:g}"
        yield self.batch_size < 1, lambda: f"batch-size must be >= 1, got {self.batch_size}"
        yield self.epochs < 1, lambda: f"epochs must be >= 1, got {self.epochs}"
        yield self.steps is not None and self.steps < 1, lambda: f"steps must be >= 1, got {self.steps}"
        yield self.schedule not in SCHEDULES, lambda: f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
        yield any(m < 0 for m in self.milestones), lambda: f"milestones must be epochs >= 0, got {self.milestones}"
        yield not self.min_lr >= 0, lambda: f"min-lr must be >= 0, got {self.min_lr:g}"
        yield self.clip is not None and not self.clip > 0, lambda: f"clip must be > 0, got {self.clip:g}"
        yield self.sampler not in SAMPLERS, lambda: f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}"
        yield self.eval_every < 0, lambda: f"eval-every must be >= 0, got {self.eval_every}"

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return self.epochs * math.ceil(n_train / self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """What a method hands to the training loop."""

    loss: object
    weight: Tensor | None = None
    #: maps test logits to the logits used for prediction and metrics (post-hoc logit adjustment).
    adjust: object = None
    #: ``reduce(per_row_losses, target=...) -> scalar`` in place of the mean (reweighting strategies).
    reduce: object = None
    #: odd-k-out training, ``(k, soft targets)``: batches of sets of ``k + 2`` examples; None: single examples
    sets: tuple[int, bool] | None = None
    info: dict = field(default_factory=dict)


def _optimizer(model: nn.Module, cfg: TrainConfig):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adam' or 'sgd'")


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    if cfg.schedule == "none":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * epoch / max(cfg.epochs, 1))) / 2
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'none', 'step' or 'cosine'")


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Logits of ``model`` on ``x`` in eval mode, in batches."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else None
    model.train(was_training)
    return out


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prepared: Prepared,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    eval_data: tuple[Tensor, Tensor] | None = None,
    on_step=None,
) -> list[dict]:
    """Train ``model`` in place; returns the history ``[{step, test_acc}]`` (every ``cfg.eval_every`` steps).

    ``on_step(k)`` is called with the number of optimizer steps just done (for progress bars).
    """
    g = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, cfg)
    n = len(y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.total_steps(n)
    history: list[dict] = []
    adjust = prepared.adjust or (lambda z: z)
    order = torch.arange(n)
    if prepared.sets is not None:
        sets = OddKOutSampler(y, k=prepared.sets[0], sets_per_batch=cfg.batch_size,
                              generator=torch.Generator().manual_seed(seed))
    model.train()
    for step in range(total):
        epoch, k = divmod(step, steps_per_epoch)
        if cfg.sampler == "cyclic":
            start = (step * cfg.batch_size) % n
            idx = order[start : start + cfg.batch_size]
        else:
            if k == 0:
                order = torch.randperm(n, generator=g) if cfg.sampler == "shuffle" else order
                for group in opt.param_groups:
                    group["lr"] = _lr_at(cfg, epoch)
            idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        if prepared.sets is not None:
            idx = sets.sample()  # [batch_size, k + 2]
            logits = model(x[idx.flatten()]).unflatten(0, idx.shape)
            target = oko_targets(y[idx], logits.shape[-1], soft=prepared.sets[1], dtype=logits.dtype)
            loss = oko_cross_entropy(logits, target, loss=prepared.loss)
        else:
            logits = model(x[idx])
            loss = cross_entropy(
                logits, y[idx], loss=prepared.loss, weight=prepared.weight, extra={"sample_ids": idx},
                reduction="none" if prepared.reduce is not None else "mean",
            )
        if prepared.reduce is not None:
            loss = prepared.reduce(loss, target=y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} with {prepared.loss!r}")
        if on_step is not None:
            on_step(1)
        if cfg.eval_every and eval_data is not None and (step + 1) % cfg.eval_every == 0:
            acc = accuracy(adjust(predict(model, eval_data[0])), eval_data[1])
            history.append({"step": step + 1, "test_acc": acc, "train_loss": loss.item()})
    return history

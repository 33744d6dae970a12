"""Losses as formulas over row statistics, their composition, and the registry.

A :class:`Loss` declares the statistics it reads (:meth:`Loss.statistics`), optional elementwise logit
transforms (:meth:`Loss.transforms`), and a per-row formula (:meth:`Loss.row_loss`) written with ordinary
torch ops on ``[N]`` tensors. Engines compute the statistics however they like; autograd on the tiny
formula gives the coefficients ``dL/dS`` and the statistics' elementwise derivatives do the rest.

A loss that cannot be written over mergeable statistics sets ``streamable = False`` and implements
:meth:`Loss.dense_row_loss` over a whole logit row instead; engines that never hold a whole row refuse it.

A loss with state (per-sample temperatures, running averages) subclasses :class:`StatefulLoss`, an
``nn.Module``: its state lives in buffers (``state_dict``, ``.to()``, ``train()``/``eval()``), and it
reads it in :meth:`Loss.observe` (once per row and forward, possibly block by block) and updates it in
:meth:`Loss.commit` (once per forward, with every row's observations); the formula reads what
``observe`` returned, never the state directly.

A loss built from other losses (``a + b``, ``k * a``, :class:`Transformed`, APL, LogitClip) subclasses
:class:`CompositeLoss`, which delegates to its parts everything they decide (where it runs, the
statistics and transforms, the state) and leaves the subclass only how the parts' losses combine.
"""

from __future__ import annotations

import functools
from typing import Callable, ClassVar

from torch import Tensor, nn

from .._loss_ref import attach
from .._rows import Rows
from ..stats import Statistic, formula_values, with_requirements
from ..transforms import Transform

_REGISTRY: dict[str, Callable[..., Loss]] = {}


def register(name: str):
    """Class decorator: make a loss available as ``crossent.losses.get(name, **hparams)``."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def get(name: str, **hparams) -> Loss:
    """Build the registered loss ``name`` with keyword hyperparameters."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available())}") from None
    return factory(**hparams)


def available() -> list[str]:
    """Names of every registered loss, sorted."""
    return sorted(_REGISTRY)


def registered() -> dict[str, type]:
    """The registry itself: name -> loss class (read-only use)."""
    return dict(_REGISTRY)


def _attaching(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        attach(self)

    __init__.attaches_ref = True
    return __init__


class Loss:
    """Base class of every crossent loss.

    Subclasses override :meth:`statistics` and :meth:`row_loss` (streamable losses), or set
    ``streamable = False`` and override :meth:`dense_row_loss` (whole-row losses).
    """

    name: ClassVar[str | None] = None
    #: computable from mergeable statistics (every engine), or needs the whole row.
    streamable: ClassVar[bool] = True
    #: accepts a ``[N, C]`` class-probability target (otherwise class indices are required).
    accepts_probs: ClassVar[bool] = False
    #: keeps state that :meth:`observe` updates (see :class:`StatefulLoss`).
    stateful: ClassVar[bool] = False
    #: the formula does not change when a constant is added to every logit of a row (it reads the logits
    #: only through differences, as every function of log-probabilities does). Such a formula reads each
    #: statistic relative to the row's maximum, which keeps it exact for logits of any size; any other
    #: reads the statistics' plain values (``crossent.stats.formula_values``).
    shift_invariant: ClassVar[bool] = False

    # Every loss built outside torch.compile carries a reference that a compiled custom op can take
    # (crossent._loss_ref): the base __init__ attaches it, and so does every subclass's __init__.
    def __init__(self):
        attach(self)

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        attach(new)  # a reference of its own (deepcopy and pickle copy the reference with the object)
        return new

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "attaches_ref", False):
            cls.__init__ = _attaching(init)

    # -- what the engine needs ------------------------------------------------------------------
    def statistics(self, rows: Rows) -> tuple[Statistic, ...]:
        """The statistics :meth:`row_loss` reads (may depend on the kind of target in ``rows``)."""
        return ()

    def transforms(self) -> tuple[Transform, ...]:
        return ()

    def extra_inputs(self) -> tuple[str, ...]:
        """The keys of ``extra`` that every call of this loss must pass: per-row inputs that it (or one of
        its transforms) reads, such as ALDR-KL's ``sample_ids``. A caller that has no ``extra`` to give
        (a patched model's forward) refuses such a loss when it is configured."""
        return tuple(dict.fromkeys(key for t in self.transforms() for key in t.extra_inputs()))

    def row_loss(self, s: dict, rows: Rows) -> Tensor:
        """Unweighted per-row loss ``[N]`` from the statistic values ``s[stat]``."""
        raise NotImplementedError(f"{type(self).__name__} defines no statistics formula")

    def weighted_row_loss(self, s: dict, rows: Rows) -> Tensor:
        """Per-row loss with PyTorch's class weighting: ``weight[y] * row_loss`` by default."""
        loss = self.row_loss(s, rows)
        w = rows.target_weight()
        return loss if w is None else loss * w.to(loss.dtype)

    def dense_row_loss(self, z: Tensor, rows: Rows) -> Tensor:
        """Weighted per-row loss ``[N]`` from the (transformed) whole logit rows ``z``, with autograd.

        The default evaluates the statistics with differentiable ops, so every streamable loss also
        has a whole-row form (used for targets that require a gradient and as a cross-check).
        """
        s = {stat: stat.compute(z, rows) for stat in with_requirements(self.statistics(rows))}
        return self.weighted_row_loss(formula_values(s, rows, self.shift_invariant), rows)

    # -- state ----------------------------------------------------------------------------------
    def observe(self, z: Tensor, rows: Rows) -> dict[str, Tensor]:
        """Per-row tensors for the formula, from whole transformed logit rows ``z`` and the current state.

        Only stateful losses observe. Engines call this through :meth:`Plan.observe` exactly once per
        row and forward (an engine may observe a forward's rows in several blocks), under ``no_grad``;
        it must not change the state. The returned tensors (``[N, ...]``, keyed by names unique to
        this loss object) reach the formula, and :meth:`commit`, in ``rows.extra``.
        """
        return {}

    def commit(self, rows: Rows) -> None:
        """Update the state from the observations of every row of one forward (``rows.extra``).

        Called once per forward by every engine (:meth:`Plan.commit`), after all rows were observed;
        a stateful loss updates only here, and only in training mode.
        """

    def state_modules(self) -> list[nn.Module]:
        """The ``nn.Module`` parts of this loss that hold state (for module wrappers to register)."""
        return [self] if isinstance(self, nn.Module) else []

    # -- composition ----------------------------------------------------------------------------
    def __add__(self, other: Loss) -> Loss:
        if not isinstance(other, Loss):
            return NotImplemented
        return SumLoss([self, other])

    def __radd__(self, other):
        if other == 0:  # lets sum([...]) work
            return self
        return NotImplemented

    def __mul__(self, k) -> Loss:
        if not isinstance(k, (int, float)):
            return NotImplemented
        return ScaledLoss(self, float(k))

    __rmul__ = __mul__

    def hparams(self) -> dict:
        """Hyperparameters as given (for reprs and tables)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class CompositeLoss(Loss):
    """Base class of every loss built from other losses, its *parts*: sums, scalings, transformed losses,
    :class:`~crossent.losses.APL`, :class:`~crossent.losses.LogitClip`,
    :class:`~crossent.losses.SoftTargetCrossEntropy`.

    A subclass hands its parts to ``super().__init__(*parts)`` and says how their per-row losses combine
    (:meth:`combine`); what the parts decide is delegated here, once, for every composite:

    * where it runs: ``streamable``, ``accepts_probs`` and ``shift_invariant`` when every part is,
      ``stateful`` when any part is;
    * its forms: the union of the parts' statistics, behind the logit transforms that the parts must
      share;
    * state: each stateful part observes the rows and commits once per forward, and
      :meth:`state_modules` lists every part's state, so the ``crossent.nn`` wrappers register it. A
      stateful loss may be used once in a composite (twice, it would update twice per forward);
    * the formula: :meth:`weighted_row_loss` and :meth:`dense_row_loss` combine the parts' own.

    Hyperparameters (:meth:`hparams`, the repr) stay the subclass's public attributes, as given: a
    part given by registry name shows as that name, while :attr:`parts` holds the loss objects.

    A subclass that changes the logits its parts see (LogitClip clips each row) overrides
    :meth:`part_logits` and :meth:`transforms`, and sets ``streamable = False``: statistics of the
    unchanged logits would not be what its parts read.
    """

    def __init__(self, *parts: Loss):
        for part in parts:
            if not isinstance(part, Loss):
                raise TypeError(
                    f"the parts of {type(self).__name__} must be crossent losses, got {type(part).__name__}"
                )
        self._parts = parts
        self._shared_transforms()
        seen: set[int] = set()
        for m in self.state_modules():
            if id(m) in seen:
                raise ValueError(
                    f"the stateful loss {m!r} is used more than once in one loss, so its state would be updated "
                    "more than once per forward; build one object per use"
                )
            seen.add(id(m))

    @property
    def parts(self) -> tuple[Loss, ...]:
        """The losses this one is built from."""
        return self._parts

    def combine(self, losses: list[Tensor]) -> Tensor:
        """This loss's per-row losses ``[N]`` from its parts' (in the order of :attr:`parts`); by default their sum."""
        return losses[0] if len(losses) == 1 else sum(losses)

    def part_logits(self, z: Tensor, rows: Rows) -> Tensor:
        """The whole transformed logit rows the parts see, from this loss's own ``z`` (the same by default)."""
        return z

    # -- where it runs --------------------------------------------------------------------------
    @property
    def streamable(self):  # type: ignore[override]
        return all(p.streamable for p in self._parts)

    @property
    def accepts_probs(self):  # type: ignore[override]
        return all(p.accepts_probs for p in self._parts)

    @property
    def stateful(self):  # type: ignore[override]
        return any(p.stateful for p in self._parts)

    @property
    def shift_invariant(self):  # type: ignore[override]
        return all(p.shift_invariant for p in self._parts)

    # -- forms ----------------------------------------------------------------------------------
    def statistics(self, rows):
        out: dict[Statistic, None] = {}
        for p in self._parts:
            for s in p.statistics(rows):
                out.setdefault(s, None)
        return tuple(out)

    def transforms(self):
        return self._shared_transforms()

    def _shared_transforms(self) -> tuple[Transform, ...]:
        chains = {tuple(p.transforms()) for p in self._parts}
        if len(chains) > 1:
            raise ValueError(
                f"the parts of {type(self).__name__} must share their logit transforms; got "
                + " vs ".join(repr(list(t)) for t in chains)
            )
        return next(iter(chains), ())

    # -- state ----------------------------------------------------------------------------------
    def observe(self, z, rows):
        stateful = [p for p in self._parts if p.stateful]
        if not stateful:
            return {}
        zp = self.part_logits(z, rows)
        seen: dict = {}
        for p in stateful:
            seen.update(p.observe(zp, rows))
        return seen

    def commit(self, rows):
        for p in self._parts:
            if p.stateful:
                p.commit(rows)

    def state_modules(self):
        return [m for p in self._parts for m in p.state_modules()]

    def extra_inputs(self):
        return tuple(dict.fromkeys([*super().extra_inputs(), *(key for p in self._parts for key in p.extra_inputs())]))

    # -- the formula ----------------------------------------------------------------------------
    def weighted_row_loss(self, s, rows):
        return self.combine([p.weighted_row_loss(s, rows) for p in self._parts])

    def dense_row_loss(self, z, rows):
        zp = self.part_logits(z, rows)
        return self.combine([p.dense_row_loss(zp, rows) for p in self._parts])


class SumLoss(CompositeLoss):
    """Sum of losses (``a + b``); the union of their statistics is computed once."""

    def __init__(self, terms):
        flat = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, SumLoss) else [t])
        super().__init__(*flat)
        self.terms = flat

    def __repr__(self):
        return " + ".join(repr(t) for t in self.terms)


class ScaledLoss(CompositeLoss):
    """``k * loss``."""

    def __init__(self, loss: Loss, scale: float):
        super().__init__(loss)
        self.loss = loss
        self.scale = scale

    def combine(self, losses):
        return self.scale * losses[0]

    def __repr__(self):
        return f"{self.scale!r} * {self.loss!r}"


class Transformed(CompositeLoss):
    """``loss`` evaluated on transformed logits: ``Transformed(CE(), Temperature(2.0))``."""

    def __init__(self, loss: Loss, *transforms: Transform):
        super().__init__(loss)
        self.loss = loss
        self.extra_transforms = tuple(transforms)

    def transforms(self):
        return self.extra_transforms + tuple(self.loss.transforms())

    def __repr__(self):
        return f"Transformed({self.loss!r}, {', '.join(map(repr, self.extra_transforms))})"


class StatefulLoss(Loss, nn.Module):
    """Base class of losses with state: an ``nn.Module`` whose buffers hold the state.

    Subclasses call ``super().__init__()`` first, register their state as buffers, read it in
    :meth:`observe` (whole rows: such a loss is not streamable), update it only in :meth:`commit` and
    only when ``self.training``; their formula reads the observations from ``rows.extra``.
    Module wrappers (``crossent.nn``) register them, so their ``state_dict``, ``train()`` and
    ``eval()`` reach the state.
    """

    stateful = True
    streamable = False

    def __init__(self):
        nn.Module.__init__(self)

    def hparams(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "training"}

    def __repr__(self) -> str:
        return Loss.__repr__(self)

    __hash__ = nn.Module.__hash__


def resolve(loss, **hparams) -> Loss:
    """A loss object from a name or an object (hyperparameters only with a name)."""
    if isinstance(loss, Loss):
        if hparams:
            raise ValueError(f"hyperparameters {sorted(hparams)} given with a loss object; set them on the object")
        return loss
    if isinstance(loss, str):
        return get(loss, **hparams)
    raise TypeError(f"loss must be a registered name or a crossent.losses.Loss, got {type(loss).__name__}")


def log_prob_target(s: dict, rows: Rows) -> Tensor:
    """``log p_y = z_y - lse`` from the statistics (helper for formulas)."""
    from ..stats import LSE, TARGET

    return s[TARGET] - s[LSE]


__all__ = ["Loss", "StatefulLoss", "CompositeLoss", "SumLoss", "ScaledLoss", "Transformed", "register", "get", "available", "registered", "resolve", "log_prob_target"]

"""The engine-independent half of every execution path.

A :class:`Plan` binds a loss to the transforms and statistics it needs and knows how to

* turn raw logits into transformed logits (:meth:`Plan.transform`),
* compute statistic values or mergeable states over a block of columns,
* evaluate the per-row loss from statistic values (:meth:`Plan.row_losses`),
* get the coefficients ``dL/dS`` by autograd on that tiny formula (:meth:`Plan.coefficients`),
* express the logit gradient in the factored form that the statistics' declared forms allow
  (:meth:`Plan.factors`, :class:`Factors`), which fused engines consume,
* turn coefficients into the gradient of the raw logits of a block (:meth:`Plan.logit_grad`),
* let a stateful loss observe each row exactly once per forward (:meth:`Plan.observe`).

Engines differ only in where the logits come from and how blocks are laid out; this file is the
single place where gradients are assembled, so every engine inherits the same semantics. No engine
tests the type of a loss, statistic or transform: what an engine may fuse is read off
:attr:`Plan.structure`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .._rows import Rows
from ..stats import ACC, Form, Statistic, formula_values, merge_states, split_lse, with_requirements
from ..transforms import Affine, Transform, affine_chain, apply_all, backward_all
from .row_grad import weighted_grad
from .softmax import softmax_rows


def refuse_second_order(engine: str, instead: str) -> None:
    """Raise, by name, inside a backward that autograd records (``create_graph=True``).

    For engines whose backward forms the gradient without a graph: returning it would silently drop
    every second derivative (a gradient penalty built on it would be a constant).
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the {engine!r} engine has no second derivatives: backward(create_graph=True) (a gradient "
            f"penalty, a Hessian-vector product) cannot differentiate its gradient; {instead}"
        )


def require_blockwise(loss, engine: str) -> None:
    """Refuse, by name, a loss that needs whole logit rows on an engine that only sees blocks of columns
    (a function of the loss alone: an engine may refuse it before it has the rows to plan)."""
    if not loss.streamable or loss.stateful:
        raise ValueError(
            f"loss {loss!r} needs whole logit rows and cannot run on the {engine!r} engine, which "
            "only sees blocks of the vocabulary; use the dense or the row-chunked ('torch') engine"
        )


#: The forms that :class:`Factors` expresses; a statistic of another form takes the generic gradient path.
FACTOR_FORMS = frozenset({Form.LOG_SUM_EXP, Form.TARGET, Form.COLUMN_SUM, Form.SQUARES, Form.ARGMAX})


@dataclass(frozen=True)
class Structure:
    """What a fused engine may assume about a plan, from the declarations of its parts.

    ``by_form`` maps each :class:`~crossent.stats.Form` of :data:`FACTOR_FORMS` to the plan's statistic
    of that form; ``generic`` lists the differentiable statistics whose gradient :class:`Factors`
    cannot express (no form, a form outside :data:`FACTOR_FORMS`, or a repeated one); ``affine`` is
    the whole transform chain when every transform is affine, else ``None``; ``forms`` pairs every
    statistic with its declared form (``None``: none), for kernels that compute more forms than
    ``Factors`` has terms; ``chain`` holds every transform's declared structure, in order.
    """

    by_form: dict
    columns: tuple  # ((stat, w), ...) for every COLUMN_SUM statistic
    generic: tuple
    affine: Affine | None
    forms: tuple = ()  # ((stat, form or None), ...) for every statistic, in plan order
    chain: tuple = ()  # (transform.structure(), ...) in the order the transforms apply

    @property
    def factored(self) -> bool:
        """The transformed-logit gradient is ``Factors``-shaped (every differentiable stat has a form)."""
        return not self.generic

    def has(self, form: Form) -> bool:
        return form in self.by_form

    def only(self, *forms: Form) -> bool:
        """Every statistic is of one of ``forms`` (column sums count as ``Form.COLUMN_SUM``)."""
        return self.factored and all(f in forms for f in self.by_form) and (not self.columns or Form.COLUMN_SUM in forms)

    @staticmethod
    def of(stats, transforms, rows: Rows) -> Structure:
        by_form: dict = {}
        columns, generic, forms = [], [], []
        for s in stats:
            form = s.form(rows)
            forms.append((s, form))
            if form is Form.COLUMN_SUM:
                columns.append((s, s.column_weights(rows)))
            elif form in FACTOR_FORMS and form not in by_form:
                by_form[form] = s
            elif s.differentiable:
                generic.append(s)
        chain = tuple(t.structure() for t in transforms)
        return Structure(by_form, tuple(columns), tuple(generic), affine_chain(transforms), tuple(forms), chain)


@dataclass
class Factors:
    """``dL/dz'_ij = softmax_i p_ij + onehot_i 1[j = y_i] + sum_k s_ki w_kj + 2 squares_i z'_ij``.

    ``z'`` are the transformed logits and ``p = softmax(z')``; every factor is a ``[N]`` float64
    tensor or ``None`` (absent); ``columns`` pairs each ``s_k`` with its class vector ``w_k``
    (``None``: ones). With an affine transform chain of scale ``k`` the raw-logit gradient is ``k``
    times this (:meth:`scaled`).
    """

    softmax: Tensor | None = None
    onehot: Tensor | None = None
    columns: list = field(default_factory=list)
    squares: Tensor | None = None

    def scaled(self, k: float) -> Factors:
        if k == 1.0:
            return self

        def mul(t):
            return None if t is None else t * k

        return Factors(mul(self.softmax), mul(self.onehot), [(s * k, w) for s, w in self.columns], mul(self.squares))

    def select(self, index) -> Factors:
        def cut(t):
            return None if t is None else t[index]

        return Factors(cut(self.softmax), cut(self.onehot), [(s[index], w) for s, w in self.columns], cut(self.squares))


class Plan:
    def __init__(self, loss, rows: Rows, transforms: tuple[Transform, ...] = ()):
        self.loss = loss
        self.transforms = tuple(transforms) + tuple(loss.transforms())
        for t in self.transforms:
            t.check(rows.num_classes)
        self.streamable = loss.streamable
        self.stateful = loss.stateful
        self.stats: list[Statistic] = with_requirements(loss.statistics(rows)) if self.streamable else []
        self.structure = Structure.of(self.stats, self.transforms, rows)

    def with_statistics(self, extra, rows: Rows) -> Plan:
        """A copy that also computes ``extra`` statistics (e.g. ``lse`` and ``argmax`` to return)."""
        if not extra or not self.streamable:
            return self
        plan = object.__new__(Plan)
        plan.__dict__.update(self.__dict__)
        plan.stats = with_requirements([*self.stats, *extra])
        plan.structure = Structure.of(plan.stats, plan.transforms, rows)
        return plan

    def require_blockwise(self, engine: str) -> None:
        """Refuse, by name, a loss that needs whole logit rows on an engine that only sees blocks of columns."""
        require_blockwise(self.loss, engine)

    # -- state ------------------------------------------------------------------------------------
    def observe(self, z: Tensor, rows: Rows) -> Rows:
        """Let a stateful loss see whole raw logit rows ``z``; return ``rows`` carrying its observations.

        Engines observe every row once per forward (in one block or several), then :meth:`commit`
        once. The formula reads the observations from the returned rows, so an engine that evaluates
        a row twice (recompute paths) passes the observed rows to the second evaluation.
        """
        if not self.stateful:
            return rows
        with torch.no_grad():
            zt = self.transform(z, rows, slice(0, z.shape[-1]))
            seen = self.loss.observe(zt, rows)
        return replace(rows, extra={**rows.extra, **seen})

    def commit(self, rows: Rows) -> None:
        """The stateful loss's one state update of a forward, from every row's observations."""
        if self.stateful:
            with torch.no_grad():
                self.loss.commit(rows)

    # -- forward --------------------------------------------------------------------------------
    def transform(self, z: Tensor, rows: Rows, cols: slice) -> Tensor:
        return apply_all(self.transforms, z, rows, cols)

    def partial_states(self, zt: Tensor, rows: Rows, cols: slice) -> dict:
        """Mergeable states of every statistic over the columns ``cols`` (``zt`` transformed)."""
        rows = self._with_peak(zt, rows)
        return {s: s.partial(zt, rows, cols) for s in self.stats}

    def merge_states(self, chunks: list[dict]) -> dict:
        """Final statistic values from the states of disjoint column chunks."""
        return {s: s.finalize(merge_states(s, [c[s] for c in chunks])) for s in self.stats}

    def statistics(self, zt: Tensor, rows: Rows) -> dict:
        """Final statistic values over whole rows."""
        rows = self._with_peak(zt, rows)
        return {s: s.compute(zt, rows) for s in self.stats}

    def _with_peak(self, zt: Tensor, rows: Rows) -> Rows:
        """``rows`` carrying the maxima of ``zt``, taken once for every statistic that measures from them."""
        if not self.stats or zt.shape[-1] == 0:
            return rows
        return replace(rows, peak=zt.amax(-1))

    def formula_values(self, values: dict, rows: Rows) -> dict:
        """The ``[N]`` numbers the formula reads (relative to the row's anchor for a shift-invariant loss)."""
        return formula_values(values, rows, self.loss.shift_invariant)

    def row_losses(self, values: dict, rows: Rows) -> Tensor:
        """Weighted per-row losses ``[N]``, zero on ignored rows."""
        return self._formula(self.formula_values(values, rows), rows)

    def _formula(self, numbers: dict, rows: Rows) -> Tensor:
        out = self.loss.weighted_row_loss(numbers, rows)
        return torch.where(rows.valid, out, torch.zeros_like(out))

    # -- backward -------------------------------------------------------------------------------
    def coefficients(self, values: dict, rows: Rows, grad_rows: Tensor) -> dict:
        """``sum_i grad_rows[i] * dL_i/dS`` per statistic, by autograd on the per-row formula."""
        wanted = [s for s in self.stats if s.differentiable]
        numbers = self.formula_values(values, rows)
        with torch.enable_grad():
            leaves = {s: (v.detach().requires_grad_() if s.differentiable else v) for s, v in numbers.items()}
            out = self._formula(leaves, rows)
            if not out.requires_grad:
                return {}
            grads = weighted_grad(out, [leaves[s] for s in wanted], grad_rows, allow_unused=True)
        return {s: g for s, g in zip(wanted, grads) if g is not None}

    def factors(self, coefs: dict) -> Factors:
        """The coefficients arranged by form (needs :attr:`Structure.factored`); transformed-logit scale."""
        by_form = self.structure.by_form

        def coef(form):
            s = by_form.get(form)
            return None if s is None else coefs.get(s)

        return Factors(
            softmax=coef(Form.LOG_SUM_EXP),
            onehot=coef(Form.TARGET),
            columns=[(coefs[s], w) for s, w in self.structure.columns if s in coefs],
            squares=coef(Form.SQUARES),
        )

    def logit_grad(
        self, z: Tensor, rows: Rows, values: dict, coefs: dict, cols: slice, out: Tensor | None = None
    ) -> Tensor:
        """``dL/dz`` for the raw logits ``z`` (``[N, width]``) of the columns ``cols``.

        With ``out`` (shaped like ``z``) the gradient is written there. A factored plan forms the
        gradient from :meth:`factors` in a few fused passes; any other goes statistic by statistic.
        """
        direct = out if out is not None and out.dtype == z.dtype else None
        if self.structure.factored:
            affine = self.structure.affine
            f = self.factors(coefs)
            if affine is not None:
                zt = affine.apply_(z.clone(), cols) if (affine.scale != 1.0 or affine.shift is not None) else z
                grad = self._apply_factors(f.scaled(affine.scale), zt, rows, values, cols, direct)
                return self._into(grad, out)
            zt = self.transform(z, rows, cols) if self.transforms else z
            grad = self._apply_factors(f, zt, rows, values, cols, direct if not self.transforms else None)
        else:
            zt = self.transform(z, rows, cols) if self.transforms else z
            grad = None
            for s in self.stats:
                if s in coefs:
                    grad = s.add_grad(grad, zt, coefs[s], values, rows, cols)
            if grad is None:
                grad = torch.zeros_like(z)
        return self._into(backward_all(self.transforms, grad, z, rows, cols), out)

    @staticmethod
    def _into(grad: Tensor, out: Tensor | None) -> Tensor:
        if out is None or grad is out:
            return grad
        return out.copy_(grad)

    def _apply_factors(self, f: Factors, zt: Tensor, rows: Rows, values: dict, cols: slice, out: Tensor | None):
        """``Factors`` applied to transformed logits ``zt`` of the columns ``cols``, into ``out`` if given."""
        dtype = zt.dtype
        if f.softmax is not None:
            if zt.shape[-1] == rows.num_classes:
                # Whole rows: the softmax straight from the logits, in one fused pass where the device has one.
                grad = softmax_rows(zt, out)
                grad.mul_(f.softmax.to(dtype)[:, None])
            else:
                hi, lo = split_lse(values[self.structure.by_form[Form.LOG_SUM_EXP]], dtype)
                # p * a = exp(z - hi) * (a * exp(-lo)): the tail of lse folds into the row factor.
                scale = (f.softmax.to(ACC) * torch.exp(-lo)).to(dtype)[:, None]
                grad = torch.sub(zt, hi[:, None], out=out) if out is not None else zt - hi[:, None]
                grad.exp_().mul_(scale)
        elif out is not None:
            grad = out.zero_()
        else:
            grad = torch.zeros_like(zt)
        if f.squares is not None:
            grad.addcmul_(zt, (2 * f.squares).to(dtype)[:, None])
        for s, w in f.columns:
            term = s.to(dtype)[:, None]
            grad.add_(term if w is None else term * w[cols].to(device=zt.device, dtype=dtype)[None, :])
        if f.onehot is not None and zt.shape[-1]:
            target = rows.require_indices("the target statistic")
            local = target - cols.start
            inside = (local >= 0) & (local < zt.shape[-1])
            grad.scatter_add_(-1, local.clamp(0, zt.shape[-1] - 1)[:, None], torch.where(inside, f.onehot, 0.0).to(dtype)[:, None])
        return grad

    # -- whole rows with autograd -----------------------------------------------------------------
    def autograd_row_losses(self, z: Tensor, rows: Rows) -> Tensor:
        """Per-row losses with ordinary autograd through the whole row (``rows`` already observed)."""
        zt = self.transform(z, rows, slice(0, z.shape[-1]))
        out = self.loss.dense_row_loss(zt, rows)
        return torch.where(rows.valid, out, torch.zeros_like(out))


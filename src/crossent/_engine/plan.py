"""The engine-independent half of every execution path.

A :class:`Plan` binds a loss to the transforms and statistics it needs and knows how to

* turn raw logits into transformed logits (:meth:`Plan.transform`),
* compute statistic values or mergeable states over a block of columns,
* evaluate the per-row loss from statistic values (:meth:`Plan.row_losses`),
* get the coefficients ``dL/dS`` by autograd on that tiny formula (:meth:`Plan.coefficients`),
* turn the coefficients into the logit gradient as :class:`Factors` (:meth:`Plan.factors`): per-row
  factors of a few elementwise terms (softmaxes, the one-hot target, class vectors, the logits), read
  off the statistics' declared forms (pair forms included) and the transform chain's structure,
* turn coefficients into the gradient of the raw logits of a block (:meth:`Plan.logit_grad`),
* let a stateful loss observe each row exactly once per forward (:meth:`Plan.observe`).

Engines differ only in where the logits come from and how blocks are laid out. :meth:`Plan.factors`
is the single place where a factored gradient is assembled: the dense and vocabulary-parallel engines
(through :meth:`Plan.logit_grad`), the row-chunked engine's factored and pair kernels and the Triton
kernels only read its terms, so every engine inherits the same semantics; a plan that declares no
form for some statistic takes ``add_grad``, statistic by statistic. No engine tests the type of a
loss, statistic or transform: what an engine may fuse is read off :attr:`Plan.structure`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .._rows import Rows
from ..stats import Form, Statistic, formula_values, merge_states, number, split_lse, with_requirements
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


#: The forms whose gradient terms :meth:`Plan.logit_grad` applies itself, in a few fused passes over a
#: block; a plan with any other statistic goes statistic by statistic there (``add_grad``).
LOGIT_GRAD_FORMS = (Form.LOG_SUM_EXP, Form.TARGET, Form.COLUMN_SUM, Form.SQUARES, Form.ARGMAX, Form.PROB_DOT_LOGIT)


@dataclass(frozen=True)
class Structure:
    """What a fused engine may assume about a plan, from the declarations of its parts.

    ``by_form`` maps each :class:`~crossent.stats.Form` but ``COLUMN_SUM`` to the plan's (first)
    statistic of that form; ``columns`` pairs every column-sum statistic with its class vector;
    ``pairs`` pairs every statistic of a student's and a teacher's logits with its
    :class:`~crossent.stats.PairForm`; ``generic`` lists the differentiable statistics whose gradient
    :class:`Factors` cannot express (no form, or a form a statistic before it already has); ``affine``
    is the whole transform chain when every transform is affine, else ``None``; ``forms`` pairs every
    statistic with its declared form (``None``: none), for kernels that compute the statistics
    themselves; ``chain`` holds every transform's declared structure, in order.
    """

    by_form: dict
    columns: tuple  # ((stat, w), ...) for every COLUMN_SUM statistic
    generic: tuple
    affine: Affine | None
    forms: tuple = ()  # ((stat, form or None), ...) for every statistic, in plan order
    chain: tuple = ()  # (transform.structure(), ...) in the order the transforms apply
    pairs: tuple = ()  # ((stat, PairForm), ...) for every statistic that declares one

    @property
    def factored(self) -> bool:
        """Every differentiable statistic declares its derivative: :meth:`Plan.factors` gives the gradient."""
        return not self.generic

    def has(self, form: Form) -> bool:
        return form in self.by_form

    def only(self, *forms: Form) -> bool:
        """Every statistic is of one of ``forms`` (column sums count as ``Form.COLUMN_SUM``; pair forms never)."""
        return (
            self.factored
            and not self.pairs
            and all(f in forms for f in self.by_form)
            and (not self.columns or Form.COLUMN_SUM in forms)
        )

    @staticmethod
    def of(stats, transforms, rows: Rows) -> Structure:
        by_form: dict = {}
        columns, generic, forms, pairs = [], [], [], []
        for s in stats:
            form = s.form(rows)
            forms.append((s, form))
            if form is Form.COLUMN_SUM:
                columns.append((s, s.column_weights(rows)))
            elif form is not None and form not in by_form:
                by_form[form] = s
            elif form is None and s.pair_form() is not None:
                pairs.append((s, s.pair_form()))
            elif s.differentiable:
                generic.append(s)
        chain = tuple(t.structure() for t in transforms)
        return Structure(
            by_form, tuple(columns), tuple(generic), affine_chain(transforms), tuple(forms), chain, tuple(pairs)
        )


class SoftmaxOf(NamedTuple):
    """A softmax that terms of a gradient multiply: of one side's logits at a scale, ``softmax(scale * x_side)``.

    ``side`` is ``"student"`` (the plan's own transformed logits ``z'``) or ``"teacher"`` (a second
    head's logits ``t`` over the same classes, :class:`~crossent.stats.PairForm`).
    """

    side: str
    scale: float


#: The softmax of the plan's own transformed logits, ``p = softmax(z')``.
OWN = SoftmaxOf("student", 1.0)


@dataclass(frozen=True)
class SoftmaxTerm:
    """``P_ij (const_i + logit_i z'_ij + teacher_i t_ij)`` for one softmax ``P``; ``None``: no such part."""

    const: Tensor | None = None
    logit: Tensor | None = None
    teacher: Tensor | None = None

    def plus(self, const=None, logit=None, teacher=None) -> SoftmaxTerm:
        return SoftmaxTerm(_plus(self.const, const), _plus(self.logit, logit), _plus(self.teacher, teacher))


@dataclass(frozen=True)
class ColumnTerm:
    """``coef_i w_j``: the gradient term of the column-sum statistic ``stat``, whose class vector is ``weights``
    (``None``: ones)."""

    stat: Statistic
    coef: Tensor
    weights: Tensor | None


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


@dataclass(frozen=True)
class Factors:
    """A plan's logit gradient as per-row factors of a few elementwise terms, filled by :meth:`Plan.factors`::

        dL/dz'_ij = sum_P P_ij (a_i + u_i z'_ij + v_i t_ij)      softmaxes: {SoftmaxOf: SoftmaxTerm(a, u, v)}
                  + g_i p_ij^k                                   prob_power, k = power
                  + h_i q_ij                                     tempered: q the softmax of the tempered lse
                  + b_i 1[j = y_i]                               onehot
                  + sum_k s_ki w_kj                              columns: (ColumnTerm(stat, s_k, w_k), ...)
                  + d_i z'_ij                                    linear (twice a sum of squares' coefficient)

    ``z'`` are the transformed logits, ``p = softmax(z')`` (the :data:`OWN` softmax), ``t`` a
    teacher's logits (plans of pair forms; the teacher's own transforms already applied). Every
    factor is an ``[N]`` tensor (float64 from :meth:`Plan.factors`) or ``None``: no such term. With an affine transform
    chain, :meth:`Plan.factors` ``(raw=True)`` folds the chain's scale in: the gradient of the raw logits.

    Engines only read the terms (each applies those its kernels form); a kernel that rebuilds ``p``
    from a head ``hi`` of ``lse`` reads the factors :meth:`relative` to it.
    """

    softmaxes: dict = field(default_factory=dict)
    prob_power: Tensor | None = None
    power: float = 1.0
    tempered: Tensor | None = None
    onehot: Tensor | None = None
    columns: tuple = ()
    linear: Tensor | None = None

    @property
    def own(self) -> SoftmaxTerm:
        """The term of ``p = softmax(z')`` (empty when there is none)."""
        return self.softmaxes.get(OWN, _NO_TERM)

    @property
    def softmax(self) -> Tensor | None:
        """The factor ``a`` of ``p`` itself."""
        return self.own.const

    def relative(self, tail: Tensor | None, tempered_tail: Tensor | None = None) -> Factors:
        """The factors for ``p`` rebuilt as ``exp(z' - hi)`` with ``lse = hi + tail``, and ``q`` likewise.

        The terms of ``p`` take ``exp(-tail)``, ``p^k`` takes ``exp(-k tail)``, ``q`` ``exp(-tempered_tail)``
        (``None``: that softmax is exact): a tail too small for the head's dtype still reaches the
        gradient (docs/design.md, Precision).
        """
        softmaxes, power, tempered = self.softmaxes, self.prob_power, self.tempered
        if tail is not None:
            unit = torch.exp(-tail)
            own = softmaxes.get(OWN)
            if own is not None:
                parts = (None if t is None else t * unit for t in (own.const, own.logit, own.teacher))
                softmaxes = {**softmaxes, OWN: SoftmaxTerm(*parts)}
            if power is not None:
                power = power * torch.exp(-self.power * tail)
        if tempered is not None and tempered_tail is not None:
            tempered = tempered * torch.exp(-tempered_tail)
        return replace(self, softmaxes=softmaxes, prob_power=power, tempered=tempered)

    @staticmethod
    def cat(parts: list[Factors]) -> Factors:
        """The factors of consecutive blocks of rows as one (every block of one plan: the same terms)."""

        def cat(ts):
            return None if ts[0] is None else torch.cat(ts)

        first = parts[0]
        softmaxes = {}
        for key in first.softmaxes:
            terms = [p.softmaxes[key] for p in parts]
            softmaxes[key] = SoftmaxTerm(
                cat([t.const for t in terms]), cat([t.logit for t in terms]), cat([t.teacher for t in terms])
            )
        columns = tuple(
            replace(term, coef=torch.cat([p.columns[k].coef for p in parts])) for k, term in enumerate(first.columns)
        )
        return Factors(
            softmaxes, cat([p.prob_power for p in parts]), first.power, cat([p.tempered for p in parts]),
            cat([p.onehot for p in parts]), columns, cat([p.linear for p in parts]),
        )  # fmt: skip


_NO_TERM = SoftmaxTerm()


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

    def factors(self, values: dict, coefs: dict, rows: Rows, *, raw: bool = False) -> Factors:
        """The gradient ``sum_S coefs[S] dS/dz'`` as :class:`Factors`, from the statistics' declared forms.

        ``values`` (of ``rows``) give the derivatives that hold their own statistic (``sum_j p_j z_j``,
        ``sum_j p_j^k``, an expectation). With ``raw`` the factors are those of the raw logits: the
        affine chain's scale is folded in (needs :attr:`Structure.affine`). Needs
        :attr:`Structure.factored`.
        """
        st = self.structure
        if st.generic:
            raise ValueError(f"the gradient of {st.generic[0]!r} (loss {self.loss!r}) has no declared form")
        scale = 1.0
        if raw:
            if st.affine is None:
                raise ValueError(f"raw factors need an affine transform chain; {self.loss!r} has {self.transforms!r}")
            scale = st.affine.scale
        forms, pairs, weights = dict(st.forms), dict(st.pairs), dict(st.columns)
        softmaxes: dict = {}
        fields: dict = {}

        def add(key: SoftmaxOf, **parts):
            softmaxes[key] = softmaxes.get(key, _NO_TERM).plus(**parts)

        columns = []
        for s in self.stats:
            c = coefs.get(s)
            if c is None:
                continue
            c = c * scale if scale != 1.0 else c
            form = forms[s]
            if form is Form.LOG_SUM_EXP:
                add(OWN, const=c)
            elif form is Form.TARGET:
                fields["onehot"] = c
            elif form is Form.COLUMN_SUM:
                columns.append(ColumnTerm(s, c, weights[s]))
            elif form is Form.SQUARES:
                fields["linear"] = 2 * c
            elif form is Form.TEMPERED_LOG_SUM_EXP:
                fields["tempered"] = c
            elif form is Form.PROB_DOT_LOGIT:  # p_j (1 + z'_j - S)
                add(OWN, const=c * (1 - number(s, values[s], rows)), logit=c)
            elif form is Form.SUM_PROB_POWER:  # k (p_j^k - p_j S)
                ck = c * s.power
                fields["prob_power"], fields["power"] = ck, s.power
                add(OWN, const=-ck * number(s, values[s], rows))
            elif s in pairs:
                pair = pairs[s]
                key = SoftmaxOf(pair.side, pair.scale)
                if pair.of is None:  # lse(scale x): scale P for the student, nothing for the teacher
                    if pair.side == "student":
                        add(key, const=c * pair.scale)
                    continue
                ws, wt = pair.of
                if pair.side == "teacher":  # E_Q[f]: ws Q
                    if ws:
                        add(key, const=c * ws)
                    continue
                # E_P[f]: scale P (ws z + wt t - E) + ws P
                k = c * pair.scale
                add(
                    key, const=c * ws - k * number(s, values[s], rows),
                    logit=k * ws if ws else None, teacher=k * wt if wt else None,
                )  # fmt: skip
        return Factors(softmaxes, columns=tuple(columns), **fields)

    def logit_grad(
        self, z: Tensor, rows: Rows, values: dict, coefs: dict, cols: slice, out: Tensor | None = None
    ) -> Tensor:
        """``dL/dz`` for the raw logits ``z`` (``[N, width]``) of the columns ``cols``.

        With ``out`` (shaped like ``z``) the gradient is written there. A plan of
        :data:`LOGIT_GRAD_FORMS` forms the gradient from :meth:`factors` in a few fused passes; any
        other goes statistic by statistic.
        """
        direct = out if out is not None and out.dtype == z.dtype else None
        if self.structure.only(*LOGIT_GRAD_FORMS):
            affine = self.structure.affine
            if affine is not None:
                zt = affine.apply_(z.clone(), cols) if (affine.scale != 1.0 or affine.shift is not None) else z
                f = self.factors(values, coefs, rows, raw=True)
                return self._into(self._apply_factors(f, zt, rows, values, cols, direct), out)
            zt = self.transform(z, rows, cols) if self.transforms else z
            f = self.factors(values, coefs, rows)
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
        """The terms of :data:`LOGIT_GRAD_FORMS` of ``f`` on transformed logits ``zt`` of the columns ``cols``."""
        dtype = zt.dtype
        lse = values.get(self.structure.by_form.get(Form.LOG_SUM_EXP))
        whole = zt.shape[-1] == rows.num_classes
        if f.softmax is not None:
            hi, lo = (None, None) if whole else split_lse(lse, dtype)
            own = f.own if whole else f.relative(lo).own
            # p (a + u z'): the factor is formed before the softmax, which may overwrite z'.
            factor = own.const.to(dtype)[:, None] if own.logit is None else self._logit_factor(own, zt, lse)
            if whole:
                # Whole rows: the softmax straight from the logits, in one fused pass where the device has one.
                grad = softmax_rows(zt, out)
            else:
                # p * a = exp(z - hi) * (a * exp(-lo)): the tail of lse folds into the row factor.
                grad = torch.sub(zt, hi[:, None], out=out) if out is not None else zt - hi[:, None]
                grad.exp_()
            grad.mul_(factor)
        elif out is not None:
            grad = out.zero_()
        else:
            grad = torch.zeros_like(zt)
        if f.linear is not None:
            grad.addcmul_(zt, f.linear.to(dtype)[:, None])
        for term in f.columns:
            coef = term.coef.to(dtype)[:, None]
            w = term.weights
            grad.add_(coef if w is None else coef * w[cols].to(device=zt.device, dtype=dtype)[None, :])
        if f.onehot is not None and zt.shape[-1]:
            target = rows.require_indices("the target statistic")
            local = target - cols.start
            inside = (local >= 0) & (local < zt.shape[-1])
            grad.scatter_add_(-1, local.clamp(0, zt.shape[-1] - 1)[:, None], torch.where(inside, f.onehot, 0.0).to(dtype)[:, None])
        return grad

    @staticmethod
    def _logit_factor(own, zt: Tensor, lse) -> Tensor:
        """``a + u z'`` per element, measured from the head ``r`` of ``lse`` (a logit of the row, when it
        is an anchored pair): ``(a + u r) + u (z' - r)``, so that ``a`` and ``u z'`` of large logits do
        not cancel in the logits' dtype."""
        ref = lse[:, 0] if lse is not None and lse.dim() == 2 else None
        const = own.const if own.const is not None else torch.zeros_like(own.logit)
        if ref is None:
            return torch.addcmul(const.to(zt.dtype)[:, None], zt, own.logit.to(zt.dtype)[:, None])
        ref_t = ref.to(zt.dtype)  # a logit of the row: exact in its dtype
        base = (const + own.logit * ref_t.to(const.dtype)).to(zt.dtype)
        return (zt - ref_t[:, None]).mul_(own.logit.to(zt.dtype)[:, None]).add_(base[:, None])

    # -- whole rows with autograd -----------------------------------------------------------------
    def autograd_row_losses(self, z: Tensor, rows: Rows) -> Tensor:
        """Per-row losses with ordinary autograd through the whole row (``rows`` already observed)."""
        zt = self.transform(z, rows, slice(0, z.shape[-1]))
        out = self.loss.dense_row_loss(zt, rows)
        return torch.where(rows.valid, out, torch.zeros_like(out))


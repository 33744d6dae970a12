"""What the Triton kernels compute for a plan, read off its declared structure (no Triton import).

One kernel source serves every streamable loss: a :class:`Program` turns the plan's statistics (by
their :class:`~crossent.stats.Form`) and its transform chain (by each transform's declared structure)
into the kernels' compile-time switches and their ``[V]`` operands. A plan the kernels cannot run
raises :class:`Unsupported`, whose message names the part that stops it.

The transform chain runs on chip as ``A0 -> [Tanh] -> A1 -> [Circle] -> A2``: affine maps (a scalar
scale and a per-class shift, composed where adjacent), at most one ``Tanh`` (softcap) and at most one
``Circle`` (after the ``Tanh``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...stats import Form
from ...transforms import Affine, Circle, Tanh
from ..plan import Plan

#: The roles of a program's statistics, one per form (column sums are listed apart).
ROLES = {
    Form.LOG_SUM_EXP: "lse",
    Form.TARGET: "target",
    Form.SQUARES: "squares",
    Form.ARGMAX: "argmax",
    Form.TEMPERED_LOG_SUM_EXP: "tempered",
    Form.PROB_DOT_LOGIT: "prob_dot",
    Form.SUM_PROB_POWER: "prob_power",
}
#: Column sums (``sum_j w_j z_j``) the kernels carry per row.
MAX_COLUMNS = 2
#: The temperatures and margins of a tempered ``lse`` that the kernels' float32 arithmetic carries: they
#: divide ``z + margin`` by ``t`` directly, so a tinier or larger temperature (or a margin near float32's
#: range) would overflow, or lose the tempered softmax to rounding. The row-chunked engine measures
#: from the row maximum and falls back to float64 there (``crossent.stats.tempered_dtype``), so
#: ``backend="auto"`` takes it for such a plan.
TEMPERATURE_RANGE = (1e-3, 1e3)
MAX_MARGIN = 1e6
#: Float32 slots of the forward kernel's per-split output, in order; a program uses those it needs.
SLOTS = ("lse_max", "lse_sum", "target", "column0", "column1", "squares", "argmax_value",
         "tempered_max", "tempered_sum", "prob_dot", "prob_power")  # fmt: skip


class Unsupported(ValueError):
    """The plan has a part the Triton kernels do not compute (the message names it)."""


@dataclass(frozen=True)
class Chain:
    """The transform chain as the kernels apply it: three affine stages around a ``Tanh`` and a ``Circle``."""

    stages: tuple[Affine, Affine, Affine] = (Affine(), Affine(), Affine())
    cap: float | None = None
    circle: Circle | None = None

    @staticmethod
    def of(structures) -> Chain:
        stages, stage, cap, circle = [Affine(), Affine(), Affine()], 0, None, None
        for s in structures:
            if isinstance(s, Affine):
                stages[stage] = stages[stage].then(s)
            elif isinstance(s, Tanh) and stage == 0:
                cap, stage = float(s.cap), 1
            elif isinstance(s, Circle) and stage < 2:
                circle, stage = s, 2
            else:
                what = "a transform that declares no structure" if s is None else f"{s!r} at this place"
                raise Unsupported(
                    f"the triton kernels apply transform chains of the form affine -> [tanh] -> affine -> "
                    f"[circle] -> affine; this chain has {what}"
                )
        return Chain(tuple(stages), cap, circle)

    @property
    def scales(self) -> tuple[float, float, float]:
        return tuple(float(a.scale) for a in self.stages)

    def shifts(self, device) -> tuple[Tensor | None, ...]:
        """The per-class shifts as float32 ``[V]`` vectors on ``device`` (``None``: no shift)."""
        return tuple(None if a.shift is None else a.shift.to(device, torch.float32).contiguous() for a in self.stages)


@dataclass
class Program:
    """The statistics of a plan by role, its column sums and its transform chain.

    ``roles`` maps a role of :data:`ROLES` to the plan's statistic; ``columns`` pairs each column-sum
    statistic with its class vector (``None``: ones); ``slots`` gives each used slot of :data:`SLOTS`
    its row in the forward output.
    """

    roles: dict
    columns: list
    chain: Chain
    slots: dict = field(default_factory=dict)

    @staticmethod
    def of(plan: Plan) -> Program:
        """The program of ``plan``; raises ``ValueError`` (:class:`Unsupported` or whole-row) otherwise."""
        plan.require_blockwise("triton")
        roles, columns, weights = {}, [], dict(plan.structure.columns)
        for stat, form in plan.structure.forms:
            if form is Form.COLUMN_SUM:
                columns.append((stat, weights[stat]))
                continue
            role = ROLES.get(form)
            loss = plan.loss
            if role is None:
                raise Unsupported(f"statistic {stat!r} declares no form the triton kernels compute (loss {loss!r})")
            if role in roles:
                raise Unsupported(
                    f"the triton kernels compute one statistic of form {form.value}; {loss!r} has "
                    f"{roles[role]!r} and {stat!r}"
                )
            if role == "tempered":
                _check_tempered(stat)
            roles[role] = stat
        if len(columns) > MAX_COLUMNS:
            raise Unsupported(
                f"the triton kernels carry at most {MAX_COLUMNS} column sums; {plan.loss!r} has {len(columns)}"
            )
        program = Program(roles, columns, Chain.of(plan.structure.chain))
        program.slots = {name: i for i, name in enumerate(n for n in SLOTS if program.uses(n))}
        return program

    def has(self, role: str) -> bool:
        return role in self.roles

    @property
    def needs_lse(self) -> bool:
        """The running maximum and sum of ``exp`` (``lse``, and the states built on it)."""
        return any(self.has(r) for r in ("lse", "prob_dot", "prob_power"))

    def uses(self, slot: str) -> bool:
        if slot in ("lse_max", "lse_sum"):
            return self.needs_lse
        if slot.startswith("column"):
            return int(slot[-1]) < len(self.columns)
        if slot in ("tempered_max", "tempered_sum"):
            return self.has("tempered")
        if slot == "argmax_value":
            return self.has("argmax")
        return self.has(slot)

    def constants(self) -> dict:
        """The compile-time switches shared by both kernels (Triton ``constexpr`` arguments)."""
        chain = self.chain
        weights = [w for _, w in self.columns] + [None] * (MAX_COLUMNS - len(self.columns))
        return dict(
            HAS_SHIFT0=chain.stages[0].shift is not None,
            HAS_SHIFT1=chain.stages[1].shift is not None,
            HAS_SHIFT2=chain.stages[2].shift is not None,
            HAS_CAP=chain.cap is not None,
            HAS_CIRCLE=chain.circle is not None,
            HAS_LSE=self.needs_lse,
            HAS_TARGET=self.has("target"),
            NUM_COLUMNS=len(self.columns),
            W0_ONES=weights[0] is None,
            W1_ONES=weights[1] is None,
            HAS_SQUARES=self.has("squares"),
            HAS_ARGMAX=self.has("argmax"),
            HAS_TEMPERED=self.has("tempered"),
            HAS_PROB_DOT=self.has("prob_dot"),
            HAS_PROB_POWER=self.has("prob_power"),
        )

    def scalars(self) -> dict:
        """The runtime scalars of the chain and of the parametrised forms."""
        chain, tempered, power = self.chain, self.roles.get("tempered"), self.roles.get("prob_power")
        s0, s1, s2 = chain.scales
        return dict(
            scale0=s0, scale1=s1, scale2=s2,
            cap=chain.cap if chain.cap is not None else 1.0,
            circle_m=chain.circle.m if chain.circle is not None else 0.0,
            circle_gamma=chain.circle.gamma if chain.circle is not None else 1.0,
            inv_temperature=1.0 / tempered.temperature if tempered is not None else 1.0,
            temper_margin=tempered.margin if tempered is not None else 0.0,
            power=power.power if power is not None else 1.0,
        )  # fmt: skip

    def column_weights(self, device) -> tuple[Tensor | None, Tensor | None]:
        """The class vectors of the column sums as float32 ``[V]`` (``None``: ones or absent)."""
        out = [None if w is None else w.to(device=device, dtype=torch.float32).contiguous() for _, w in self.columns]
        return tuple(out + [None] * (MAX_COLUMNS - len(out)))


def _check_tempered(stat) -> None:
    low, high = TEMPERATURE_RANGE
    if not low <= stat.temperature <= high or abs(stat.margin) > MAX_MARGIN:
        raise Unsupported(
            f"the triton kernels compute a tempered lse in float32 for temperatures in [{low:g}, {high:g}] and "
            f"margins up to {MAX_MARGIN:g} in size; {stat!r} has temperature {stat.temperature:g} and margin "
            f"{stat.margin:g} (the row-chunked engine, backend='torch', is exact there)"
        )


def unsupported(plan: Plan) -> str | None:
    """Why the Triton kernels cannot run ``plan`` (``None``: they can)."""
    try:
        Program.of(plan)
    except ValueError as err:
        return str(err)
    return None


__all__ = [
    "MAX_COLUMNS", "MAX_MARGIN", "ROLES", "SLOTS", "TEMPERATURE_RANGE", "Chain", "Program", "Unsupported", "unsupported",
]

"""Method specs of ``crossent compare --losses``: registry losses plus the data-dependent strategies.

A spec is ``NAME[:key=value[:key=value...]]`` (``,key=value`` after the first also works), for example
``ce``, ``gce:q=0.7``, ``sce:alpha=0.1:beta=1``. ``NAME`` is a registered loss
(``crossent losses``) or one of the strategies that need the training data:

=========================  ==========================================================================
``cb[:beta=0.9999][:loss=NAME]``  class-balanced row weights (Cui et al. 2019) on a loss (``ce``),
                           mean of ``w[y] * loss`` over the batch as in the official code
``la[:tau=1]``             logit-adjusted loss: CE on ``z + tau log prior`` (Menon et al. 2021)
``la_posthoc[:tau=1]``     CE training, predictions from ``z - tau log prior``
``forward_correction``     Patrini et al.'s forward correction with ``T`` estimated from a CE model
                           trained first (anchor at the 97th percentile); ``T=oracle`` uses the true
                           noise matrix
``oko[:k=1][:targets=hard]``  odd-k-out learning (Muttenthaler et al. 2024, ``crossent.sets``): each step
                           draws ``--batch-size`` sets of ``k + 2`` examples (k + 2 times a CE step's
                           examples) and takes CE of each set's summed logits; ``targets=soft`` for
                           the set's class frequencies; predictions from single examples
=========================  ==========================================================================

Unlisted keys of a strategy are passed to its base loss (``cb:loss=focal:gamma=1``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from crossent import losses as L

from .train import Prepared

STRATEGIES = ("cb", "la", "la_posthoc", "forward_correction", "oko")


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class Method:
    """One ``--losses`` entry: ``label`` is the spec as written (used in tables and plots)."""

    label: str
    name: str
    hparams: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Method:
        spec = spec.strip()
        name, *parts = spec.split(":")
        hparams = {}
        for p in parts:
            if "=" not in p:
                raise ValueError(f"bad hyperparameter {p!r} in {spec!r}: expected key=value")
            k, v = p.split("=", 1)
            hparams[k.strip()] = _value(v.strip())
        if not name:
            raise ValueError(f"empty loss name in {spec!r}")
        return cls(spec, name.strip(), hparams)

    def check(self) -> None:
        """ValueError, naming this spec, on an unknown name or a bad hyperparameter (before any training)."""
        try:
            self._check()
        except (TypeError, ValueError) as e:
            message = str(e)
            raise ValueError(message if message.startswith(self.label) else f"{self.label}: {message}") from None

    @property
    def needs_noise(self) -> bool:
        """Whether the method reads the true noise matrix (``forward_correction:T=oracle``)."""
        return self.name == "forward_correction" and self.hparams.get("T") == "oracle"

    def _check(self) -> None:
        hp = dict(self.hparams)
        if self.name == "cb":
            _number(hp.pop("beta", 0.9999), "beta", low=0.0, high=1.0, high_open=True)
            base = hp.pop("loss", "ce")
            if base in STRATEGIES or base not in L.available():
                raise ValueError(f"loss={base!r} is not a registered loss; see crossent losses")
            _build(base, hp)
        elif self.name in ("la", "la_posthoc"):
            _number(hp.pop("tau", 1.0), "tau")
            _build("ce", hp)
        elif self.name == "forward_correction":
            if "forward_correction" not in L.available():
                raise ValueError("forward_correction is not registered in this version of crossent.losses")
            if hp.pop("T", None) not in (None, "oracle"):
                raise ValueError("T must be 'oracle' or left out (estimated from a CE model)")
            _number(hp.pop("percentile", 97), "percentile", low=0.0, high=100.0, low_open=True)
            _build("forward_correction", {"T": torch.eye(2), **hp})
        elif self.name == "oko":
            k = hp.pop("k", 1)
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"k must be an integer >= 1, got {k!r}")
            if hp.pop("targets", "hard") not in ("hard", "soft"):
                raise ValueError("targets must be 'hard' or 'soft'")
            _build("ce", hp)
        else:
            _build(self.name, hp)

    def prepare(self, ctx: Context) -> Prepared:
        hp = dict(self.hparams)
        if self.name == "cb":
            beta = float(hp.pop("beta", 0.9999))
            base = L.get(hp.pop("loss", "ce"), **hp)
            w = class_balanced_weight(ctx.counts, beta)
            return Prepared(base, reduce=class_balanced_reduce(ctx.counts, beta), info={"beta": beta, "weights": w.tolist()})
        if self.name in ("la", "la_posthoc"):
            tau = float(hp.pop("tau", 1.0))
            bias = log_prior(ctx.counts, tau)
            wt = _weighting()
            if self.name == "la":
                if wt is not None:
                    loss = wt.LogitAdjustment.from_counts(ctx.counts, tau).loss("ce", **hp)
                else:
                    from crossent.transforms import ClassBias

                    loss = L.Transformed(L.get("ce", **hp), ClassBias(bias))
                return Prepared(loss, info={"tau": tau})
            adjust = (wt.LogitAdjustment.from_counts(ctx.counts, tau).adjust if wt is not None
                      else lambda z: z - bias.to(z.dtype))
            return Prepared(L.get("ce", **hp), adjust=adjust, info={"tau": tau})
        if self.name == "forward_correction":
            return _forward_correction(hp, ctx)
        if self.name == "oko":
            k, targets = int(hp.pop("k", 1)), hp.pop("targets", "hard")
            return Prepared(L.get("ce", **hp), sets=(k, targets == "soft"), info={"k": k, "targets": targets})
        # per-sample state (ALDR-KL's adaptive lambda) is sized to the training set
        if "num_samples" not in hp and ctx.num_train is not None:
            if "num_samples" in inspect.signature(L.registered()[self.name]).parameters:
                hp["num_samples"] = ctx.num_train
        return Prepared(L.get(self.name, **hp))


def _number(value, key: str, low: float | None = None, high: float | None = None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{key} must be in {lo}{low:g}, {high:g}{hi}, got {value:g}")
    return value


def _build(name: str, hparams: dict):
    """``L.get(name, **hparams)`` with unknown names and keywords reported in one line."""
    if name not in L.available():
        raise ValueError(f"unknown loss {name!r}; see crossent losses (or the strategies {', '.join(STRATEGIES)})")
    accepted = set(inspect.signature(L.registered()[name]).parameters)
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted - {"T"})) or "no hyperparameters"
        raise ValueError(f"unknown hyperparameter {unknown[0]!r} of {name} (it takes: {takes})")
    for key, value in hparams.items():
        if key in ("clip", "normalize") or value is None or isinstance(value, (bool, int, float)):
            continue
        if _annotation_is_numeric(L.registered()[name], key):
            raise ValueError(f"{key} must be a number, got {value!r}")
    return L.get(name, **hparams)


def _annotation_is_numeric(cls, key: str) -> bool:
    annotation = inspect.signature(cls).parameters[key].annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.split("|")[0].strip() in ("float", "int")


@dataclass
class Context:
    """What strategies may read about the (corrupted) training set."""

    counts: torch.Tensor
    num_classes: int
    #: true noise matrix (for ``T=oracle``), or None without label noise
    true_transition: torch.Tensor | None = None
    #: ``fit_ce() -> train-set probabilities [N, C]`` of a CE model trained with the same config
    fit_ce: object = None
    noisy_labels: torch.Tensor | None = None
    num_train: int | None = None


def log_prior(counts: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``log(prior^tau + 1e-12)``, the shift of logit adjustment (official code's form)."""
    prior = counts.double() / counts.sum()
    return torch.log(prior**tau + 1e-12).float()


def _weighting():
    try:
        from crossent import weighting
    except ImportError:  # the strategies module is optional for the harness
        return None
    return weighting


def class_balanced_weight(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """``w_c = (1 - beta) / (1 - beta^n_c)``, rescaled to sum to ``C`` (Cui et al. 2019)."""
    wt = _weighting()
    if wt is not None:
        return wt.ClassBalanced(counts, beta).class_weights
    n = counts.double()
    w = (1 - beta) / -torch.expm1(n * torch.log(torch.tensor(beta, dtype=torch.float64)))
    return (w * len(counts) / w.sum()).float()


def class_balanced_reduce(counts: torch.Tensor, beta: float):
    """``losses, target -> mean_i w[y_i] losses_i`` (the official softmax code's reduction)."""
    wt = _weighting()
    if wt is not None:
        return wt.ClassBalanced(counts, beta)
    w = class_balanced_weight(counts, beta)
    return lambda losses, target: (w.to(losses.dtype)[target] * losses).mean()


def _forward_correction(hp: dict, ctx: Context) -> Prepared:
    t = hp.pop("T", None)
    percentile = float(hp.pop("percentile", 97))
    info: dict = {}
    if t == "oracle":
        if ctx.true_transition is None:
            raise ValueError("forward_correction:T=oracle needs label noise (--noise)")
        T = ctx.true_transition.float()
        info["T"] = "oracle"
    elif t is None:
        from crossent.weighting import estimate_transition_matrix

        probs = ctx.fit_ce()
        T = estimate_transition_matrix(probs, ctx.noisy_labels, percentile=percentile).float()
        info["T"] = f"estimated (p{percentile:g})"
        if ctx.true_transition is not None:
            info["T_error"] = (T.double() - ctx.true_transition).abs().sum(1).mean().item()
    else:
        raise ValueError("forward_correction takes T=oracle or no T (estimated from a CE model)")
    return Prepared(L.get("forward_correction", T=T, **hp), info=info)


def parse_list(text: str) -> list[Method]:
    """``"ce,gce:q=0.7,sce:alpha=0.1,beta=1"`` -> methods (``,k=v`` continues the previous entry)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece and specs:
            specs[-1] += ":" + piece
        else:
            specs.append(piece)
    if not specs:
        raise ValueError("no loss given")
    methods = [Method.parse(s) for s in specs]
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a loss is listed twice: {labels}")
    return methods

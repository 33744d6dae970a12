"""The options of ``crossent compare`` and their translation into a :class:`CompareConfig`.

Everything a user can get wrong is checked here, before any data is loaded or any model trained: each
mistake is one :class:`OptionError` naming the option. Options that would have no effect (a noise
rate without noise, a momentum for Adam, widths for a CNN) are errors too, so that a run never
silently differs from what its command line says. What a dataset is (its kind, inputs and number of
classes) comes from :data:`.datasets.PROFILES`, so that no check here reads data.

Two mistakes need the data, and are reported after the options' checks, when the dataset is loaded but
before any training: a dataset that is not installed (``--dataset``, with how to install it), and a noise
definition that these training labels cannot take (``--noise apl-symmetric`` flips as many labels in
every class, which a long tail or a small ``--train-size`` may not have).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ..argtypes import finite_float
from ..text import width
from . import datasets, layout, noise, protocols
from .config import MAX_SEED, CompareConfig, OptionError
from .models import ACTIVATIONS, INITS, MODELS
from .train import OPTIMIZERS, SAMPLERS, SCHEDULES, TrainConfig

DEFAULT_LOSSES = "ce,ce:label_smoothing=0.1,focal,gce,sce"
DEFAULT_NOISE_RATE = "0.4"


# -- parsing helpers --------------------------------------------------------------------------------
def _numbers(text: str, cast, option: str) -> tuple:
    try:
        values = tuple(cast(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise OptionError(option, f"expected comma-separated {cast.__name__}s, got {text!r}") from None
    if not values:
        raise OptionError(option, "needs at least one value")
    return values


def _need(condition: bool, option: str, message: str) -> None:
    if not condition:
        raise OptionError(option, message)


# -- the argument parser ----------------------------------------------------------------------------
#: flags a protocol presets: (flag, dest, type, help)
PRESET_FLAGS = (
    ("--model", "model", str, f"one of {', '.join(MODELS)}"),
    ("--hidden", "hidden", str, "MLP widths, comma-separated"),
    ("--activation", "activation", str, f"MLP activation: {', '.join(ACTIVATIONS)}"),
    ("--init", "init", str, f"MLP/linear initialisation: {', '.join(INITS)}"),
    ("--optimizer", "optimizer", str, f"one of {', '.join(OPTIMIZERS)}"),
    ("--lr", "lr", finite_float, "initial learning rate"),
    ("--momentum", "momentum", finite_float, "SGD momentum"),
    ("--weight-decay", "weight_decay", finite_float, "L2 weight decay"),
    ("--batch-size", "batch_size", int, "examples per step"),
    ("--epochs", "epochs", int, "passes over the training set"),
    ("--steps", "steps", int, "optimizer steps (replaces --epochs)"),
    ("--sampler", "sampler", str, f"batch order: {', '.join(SAMPLERS)}"),
    ("--schedule", "schedule", str, f"learning-rate schedule: {', '.join(SCHEDULES)}"),
    ("--milestones", "milestones", str, "epochs at which --schedule step divides the rate by 10, comma-separated"),
    ("--min-lr", "min_lr", finite_float, "final rate of --schedule cosine"),
    ("--clip", "clip", finite_float, "gradient-norm clip"),
    ("--eval-every", "eval_every", int, "steps between test evaluations in the history (0: at the end only)"),
    ("--split", "split", str, "train/test split: default (the dataset's) or random:N"),
    ("--scaling", "scaling", str, f"feature scaling of tabular data: {', '.join(layout.SCALINGS)}"),
)
_FALLBACK = {**{k: v for k, v in TrainConfig().to_dict().items()}, "model": "mlp", "hidden": (100, 100),
             "activation": "relu", "residual": False, "init": "default", "split": "default", "scaling": "the dataset's"}


def _preset_value(proto: protocols.Protocol, dest: str):
    if dest in ("hidden", "activation", "residual") and proto.model.get("model", "mlp") != "mlp":
        return "-"  # the protocol's model has no such setting
    if dest == "milestones":
        epochs = proto.train.get("epochs")
        fracs = proto.train.get("milestones", ())
        return ",".join(str(round(f * epochs)) for f in fracs) if fracs and epochs else "-"
    for part in (proto.train, proto.model, proto.data_for("letter")):
        if dest in part:
            value = part[dest]
            return ",".join(map(str, value)) if isinstance(value, tuple) else value
    value = _FALLBACK.get(dest)
    return "-" if value is None else (",".join(map(str, value)) if isinstance(value, tuple) else value)


def _preset_help(dest: str) -> str:
    values = {name: _preset_value(p, dest) for name, p in protocols.PROTOCOLS.items()}
    if len(set(map(str, values.values()))) == 1:
        return f"default: {next(iter(values.values()))} under every protocol"
    return "default by protocol: " + ", ".join(f"{k} {v}" for k, v in values.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``crossent compare``, with its default in the help."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(datasets.available())} (default: digits)")
    g.add_argument("--noise", default="none", metavar="NAME",
                   help=f"label noise on the training set: none, {', '.join(noise.names())} (default: none)")
    g.add_argument("--noise-rate", default=None, metavar="RATES",
                   help=f"noise rate(s) in [0, 1], comma-separated, e.g. 0.2,0.4 (default with --noise: {DEFAULT_NOISE_RATE})")
    g.add_argument("--imbalance", type=finite_float, default=None,
                   help="long tail: n_i = n_max * ratio^(-i/(C-1)), a finite ratio >= 1 (default: off)")
    g.add_argument("--train-size", type=int, default=None, help="stratified subsample of the training set (default: all)")
    g = p.add_argument_group("methods")
    g.add_argument("--losses", default=DEFAULT_LOSSES,
                   help="registry names with hyperparameters (gce:q=0.7), or the strategies cb, la, la_posthoc, "
                   f"forward_correction, oko; see crossent losses (default: {DEFAULT_LOSSES})")
    names = ", ".join(f"{p.name} ({p.summary})" for p in protocols.PROTOCOLS.values())
    g = p.add_argument_group("protocol (a preset of the settings below; each flag overrides it)")
    g.add_argument("--protocol", default="quick", metavar="NAME", help=f"{names} (default: quick)")
    for flag, dest, kind, text in PRESET_FLAGS:
        g.add_argument(flag, dest=dest, type=kind, default=None, help=f"{text} ({_preset_help(dest)})")
    g.add_argument("--residual", default=None, action=argparse.BooleanOptionalAction,
                   help=f"MLP: h + act(W h) between hidden layers of equal width ({_preset_help('residual')})")
    g.add_argument("--nesterov", default=None, action=argparse.BooleanOptionalAction,
                   help=f"Nesterov momentum for SGD ({_preset_help('nesterov')})")
    g = p.add_argument_group("seeds and calibration")
    g.add_argument("--seeds", type=int, default=1, help="number of seeds (default: 1)")
    g.add_argument("--seed", type=int, default=None,
                   help="first seed (default: 42 under --protocol mnist1d, else 0)")
    g.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on a held-out part of the training set and report both (default: off)")
    g.add_argument("--val-fraction", type=finite_float, default=None,
                   help="share of the training set held out by --calibrate (default: 0.1)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="results folder (default: results/compare-DATASET)")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots (default: plots on)")
    g.add_argument("--quiet", action="store_true", help="no progress bar, log lines only (default: bar on)")
    g.add_argument("--dry-run", action="store_true",
                   help="check every option, say what would run, and stop: no data loaded, nothing trained or "
                   "written (default: off)")


# -- from arguments to a configuration ------------------------------------------------------------
def _protocol_settings(args, proto: protocols.Protocol, dataset: str) -> dict:
    """The protocol's settings with every explicit flag applied over them."""
    settings = {**proto.model, **proto.data_for(dataset)}
    train = dict(proto.train)
    fracs = train.pop("milestones", ())
    if args.steps is not None or args.epochs is not None:
        train.pop("steps", None)  # an explicit length replaces the preset's, in either unit
    for flag, dest, *_ in PRESET_FLAGS:
        value = getattr(args, dest)
        if value is not None and dest not in ("milestones",):
            (settings if dest in ("model", "hidden", "activation", "init", "split", "scaling") else train)[dest] = value
    for dest in ("residual", "nesterov"):
        if getattr(args, dest) is not None:
            (settings if dest == "residual" else train)[dest] = getattr(args, dest)
    epochs = train.get("epochs", TrainConfig.epochs)
    if args.milestones is not None:
        train["milestones"] = _numbers(args.milestones, int, "--milestones")
    else:
        train["milestones"] = tuple(round(f * epochs) for f in fracs)
    return settings | {"train": train}


def _check_model_flags(args, settings: dict) -> None:
    model = settings.get("model", "mlp")
    _need(model in MODELS, "--model", f"must be one of {', '.join(MODELS)}, got {model!r}")
    if model != "mlp":
        for flag, dest in (("--hidden", "hidden"), ("--activation", "activation"), ("--residual", "residual")):
            _need(getattr(args, dest) is None, flag, f"applies to --model mlp only; the {model} model would ignore it")
    if model == "cnn":
        _need(args.init is None, "--init", "applies to the linear and MLP models only")
    if isinstance(settings.get("hidden"), str):
        settings["hidden"] = _numbers(settings["hidden"], int, "--hidden")
    _need(all(h >= 1 for h in settings.get("hidden", (1,))), "--hidden", "widths must be >= 1")
    _need(settings.get("activation", "relu") in ACTIVATIONS, "--activation",
          f"must be one of {', '.join(ACTIVATIONS)}, got {settings.get('activation')!r}")
    _need(settings.get("init", "default") in INITS, "--init",
          f"must be one of {', '.join(INITS)}, got {settings.get('init')!r}")


def _check_train_flags(args, train: dict) -> TrainConfig:
    _need(not (args.steps is not None and args.epochs is not None), "--epochs", "cannot be used together with --steps")
    try:
        cfg = TrainConfig(**train)
        cfg.check()
    except ValueError as e:
        option = "--" + str(e).split(" ", 1)[0]
        raise OptionError(option, str(e).split(" ", 1)[1] if " " in str(e) else str(e)) from None
    if args.momentum is not None:
        _need(cfg.optimizer == "sgd", "--momentum", f"applies to --optimizer sgd only; {cfg.optimizer} would ignore it")
    if args.nesterov is not None:
        _need(cfg.optimizer == "sgd", "--nesterov", f"applies to --optimizer sgd only; {cfg.optimizer} would ignore it")
    if args.milestones is not None:
        _need(cfg.schedule == "step", "--milestones", "applies to --schedule step only")
        late = [m for m in cfg.milestones if m >= cfg.epochs]
        _need(not late, "--milestones", f"epoch {late[0] if late else 0} is not before the last of {cfg.epochs} epochs")
    if cfg.schedule == "step":
        _need(bool(cfg.milestones), "--schedule", "step needs --milestones (epochs at which the rate drops)")
        _need(cfg.steps is None, "--schedule", "step counts epochs; it cannot be combined with --steps")
    if args.min_lr is not None:
        _need(cfg.schedule == "cosine", "--min-lr", "applies to --schedule cosine only")
    if cfg.sampler == "cyclic" and args.schedule is not None:
        _need(cfg.schedule == "none", "--schedule", "the cyclic sampler runs at a constant rate")
    return cfg


def _check_data_flags(args, dataset: str, settings: dict):
    kind = datasets.profile(dataset).kind
    try:
        layout.parse_split(settings.get("split", "default"))
    except ValueError as e:
        raise OptionError("--split", str(e)) from None
    scaling = settings.get("scaling")
    if scaling is not None:
        _need(scaling in layout.SCALINGS, "--scaling", f"must be one of {', '.join(layout.SCALINGS)}, got {scaling!r}")
    if kind != "tabular":
        for flag, dest in (("--split", "split"), ("--scaling", "scaling")):
            _need(getattr(args, dest) is None, flag, f"applies to tabular datasets; {dataset} is {kind}")
        settings.pop("split", None)
        settings.pop("scaling", None)


def _noise(args) -> tuple[str, tuple[float, ...]]:
    if args.noise == "none":
        _need(args.noise_rate is None, "--noise-rate", "applies only with --noise; without it no label is corrupted")
        return "none", (0.0,)
    try:
        noise.get(args.noise)
    except ValueError as e:
        raise OptionError("--noise", str(e)) from None
    rates = _numbers(args.noise_rate or DEFAULT_NOISE_RATE, float, "--noise-rate")
    for r in rates:
        _need(0.0 <= r <= 1.0, "--noise-rate", f"rates must be in [0, 1], got {r:g}")
    _need(len(set(rates)) == len(rates), "--noise-rate", f"a rate is listed twice: {','.join(map(str, rates))}")
    return args.noise, rates


def _check_out(out: Path, create: bool = True) -> None:
    """The results folder must be creatable now, not after hours of training (``create=False``: only
    check that nothing in its way is a file)."""
    for parent in [out, *out.parents]:
        if parent.exists():
            _need(parent.is_dir(), "--out", f"{parent} exists and is not a folder")
            break
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError("--out", f"cannot create {out}: {e.strerror or e}") from None


def config_from_args(args):
    """Check every option and return ``(CompareConfig, out_folder)``; OptionError on the first mistake."""
    from .methods import parse_list

    try:
        dataset = datasets.canonical_name(args.dataset)
    except ValueError as e:
        raise OptionError("--dataset", str(e)) from None
    try:
        proto = protocols.get(args.protocol)
    except ValueError as e:
        raise OptionError("--protocol", str(e)) from None
    try:
        methods = parse_list(args.losses)
        for m in methods:
            m.check()
    except ValueError as e:
        raise OptionError("--losses", str(e)) from None
    noise_name, rates = _noise(args)
    for m in methods:
        _need(not (m.needs_noise and noise_name == "none"), "--losses",
              f"{m.label} needs label noise (--noise) to know the true transition matrix")
    settings = _protocol_settings(args, proto, dataset)
    _check_model_flags(args, settings)
    train = _check_train_flags(args, settings.pop("train"))
    _check_data_flags(args, dataset, settings)
    _need(args.seeds >= 1, "--seeds", f"must be >= 1, got {args.seeds}")
    seed0 = args.seed if args.seed is not None else proto.seed
    _need(seed0 >= 0, "--seed", f"must be >= 0, got {seed0}")
    _need(seed0 + args.seeds - 1 <= MAX_SEED, "--seed" if args.seeds == 1 else "--seeds",
          f"the last seed, {seed0 + args.seeds - 1}, is above {MAX_SEED}")
    if args.val_fraction is not None:
        _need(args.calibrate, "--val-fraction", "applies only with --calibrate")
        _need(0 < args.val_fraction < 1, "--val-fraction", f"must be in (0, 1), got {args.val_fraction:g}")
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise OptionError("--no-plots", "plots need matplotlib (pip install matplotlib), or pass --no-plots") from None
    out = Path(args.out or f"results/compare-{dataset}")
    cfg = CompareConfig(
        dataset=dataset, methods=methods, model=settings.get("model", "mlp"), hidden=tuple(settings.get("hidden", (100, 100))),
        activation=settings.get("activation", "relu"), residual=bool(settings.get("residual", False)),
        init=settings.get("init", "default"), split=settings.get("split", "default"), scaling=settings.get("scaling"),
        noise=noise_name, noise_rates=rates, imbalance=args.imbalance, train_size=args.train_size,
        seeds=tuple(range(seed0, seed0 + args.seeds)), calibrate=args.calibrate,
        val_fraction=args.val_fraction if args.val_fraction is not None else 0.1, train=train,
    )
    cfg.check()  # what the flags alone cannot tell: the noise on this many classes, the model on these inputs
    _check_out(out, create=not args.dry_run)  # last: only a command that passed every other check creates its folder
    return cfg, out


def plan(cfg: CompareConfig, out: Path) -> str:
    """What ``crossent compare`` would run (``--dry-run``), as text for a terminal.

    The checks that need the loaded data are named, not made: no data is loaded.
    """
    rates = cfg.noise_rates if cfg.noise != "none" else (0.0,)
    runs = len(cfg.methods) * len(rates) * len(cfg.seeds)
    length = f"{cfg.train.steps} steps" if cfg.train.steps is not None else f"{cfg.train.epochs} epochs"
    labels = "clean labels" if cfg.noise == "none" else f"{cfg.noise} noise at {', '.join(f'{r:g}' for r in rates)}"
    unchecked = [f"that {cfg.dataset} is installed"]
    if cfg.imbalance:
        unchecked.append("that every class keeps an example under --imbalance")
    if cfg.noise != "none":
        unchecked.append("that its training labels take the noise")
    text = (f"dry run: the options are valid. Would train {runs} model{'s' * (runs != 1)} ({len(cfg.methods)} "
            f"loss{'es' * (len(cfg.methods) != 1)} x {len(rates)} noise rate{'s' * (len(rates) != 1)} x "
            f"{len(cfg.seeds)} seed{'s' * (len(cfg.seeds) != 1)}): {cfg.model} on {cfg.dataset}, {labels}, {length} "
            f"each, into {out}. Checked only once the data is loaded: {' and '.join(unchecked) if len(unchecked) < 3 else ', '.join(unchecked[:-1]) + ', and ' + unchecked[-1]}.")
    return textwrap.fill(text, width(), break_on_hyphens=False)

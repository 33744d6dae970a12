"""The ``crossent`` command: ``losses`` (the registry), ``bench`` (speed and memory), ``compare`` (losses on data).

Run ``crossent <command> --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
from pathlib import Path

# Optimisation presets of published protocols (see docs/results.md); any flag overrides them.
PROTOCOLS = {
    "quick": {"optimizer": "adam", "lr": 1e-2, "batch_size": 64, "epochs": 20},
    # Greydanus & Kobak 2020: Adam 1e-2, batch 100, 6000 steps walking the data in order, eval every 250;
    # the reference MLP adds a residual connection around its second hidden layer
    "mnist1d": {"optimizer": "adam", "lr": 1e-2, "batch_size": 100, "steps": 6000, "eval_every": 250,
                "sampler": "cyclic", "seed": 42, "residual": True},
    # LDR-KL tabular protocol: tanh FFNN, SGD momentum 0.9, batch 64, 100 epochs, lr/10 at 50 and 75, wd 5e-3
    "ldr": {"optimizer": "sgd", "lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-3, "batch_size": 64, "epochs": 100,
            "schedule": "step", "milestones": (0.5, 0.75), "activation": "tanh"},
    # Active-Passive-Losses MNIST config: SGD 0.01 Nesterov 0.9, wd 1e-2, cosine to 1e-3, batch 128, clip 5, 50 epochs
    "apl": {"optimizer": "sgd", "lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2,
            "batch_size": 128, "epochs": 50, "schedule": "cosine", "min_lr": 1e-3, "clip": 5.0},
}


# -- crossent losses ---------------------------------------------------------------------------------
def _doc_lines(cls) -> list[str]:
    return [line.strip() for line in (inspect.getdoc(cls) or "").splitlines()]


def loss_formula(cls) -> str:
    """``cls.formula`` if set, else the first line of the docstring."""
    formula = getattr(cls, "formula", "")
    if formula:
        return str(formula)
    lines = [line for line in _doc_lines(cls) if line]
    return lines[0] if lines else ""


def loss_paper(cls) -> str:
    """``cls.paper`` if set, else the docstring's ``Reference:`` line (or ``Paper:``)."""
    paper = getattr(cls, "paper", "")
    if paper:
        return str(paper)
    lines = _doc_lines(cls)
    for i, line in enumerate(lines):
        for tag in ("Reference:", "References:", "Paper:"):
            if line.startswith(tag):
                text = [line[len(tag) :].strip()]
                for more in lines[i + 1 :]:  # the reference may wrap over several lines
                    if not more:
                        break
                    text.append(more)
                return " ".join(t for t in text if t)
    return ""


def loss_streams(cls) -> str:
    """``yes``/``no``; for losses where it depends on hyperparameters, the answer at the defaults."""
    value = inspect.getattr_static(cls, "streamable", None)
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        default = cls()
    except (TypeError, ValueError):  # a required hyperparameter (e.g. a transition matrix)
        return "depends on hyperparameters"
    return ("yes" if default.streamable else "no") + " at defaults; depends on hyperparameters"


def losses_table(fmt: str = "markdown") -> str:
    from . import losses

    rows = [(name, loss_formula(cls), loss_paper(cls), loss_streams(cls)) for name, cls in sorted(losses.registered().items())]
    if fmt == "json":
        return json.dumps([dict(zip(("name", "formula", "paper", "streams"), r)) for r in rows], indent=1)
    if fmt == "names":
        return "\n".join(r[0] for r in rows)
    head = ("name", "formula", "paper", "streams")
    out = ["| " + " | ".join(head) + " |", "|---|---|---|---|"]
    out += ["| " + " | ".join([f"`{r[0]}`", r[1].replace("|", "\\|"), r[2].replace("|", "\\|"), r[3]]) + " |" for r in rows]
    return "\n".join(out)


def cmd_losses(args) -> int:
    print(losses_table(args.format))
    return 0


# -- crossent bench ----------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    try:
        from .bench import linear
    except ImportError as e:
        if "crossent.bench" not in str(e) and "linear" not in str(e):
            raise
        print(
            "crossent bench needs the crossent.bench.linear module, which this installation lacks "
            f"({e}). Install a crossent version that ships it.",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="crossent bench", description=linear.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    linear.add_arguments(parser)
    bench_args = parser.parse_args(args.bench_args)
    if args.threads is not None:  # otherwise the bench module keeps its own default
        _threads(args.threads)
    linear.run(bench_args)
    return 0


# -- crossent compare --------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _threads(n) -> None:
    import torch

    if n:
        torch.set_num_threads(int(n))


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from .experiments import datasets

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(datasets.available())} (default digits)")
    g.add_argument("--noise", default="none", choices=("none", "symmetric", "pair"), help="label noise on the training set")
    g.add_argument("--noise-rate", default="0.4", help="noise rate(s), comma-separated: 0.2,0.4,0.6")
    g.add_argument("--imbalance", type=float, default=None, help="long tail: n_i = n_max * ratio^(-i/(C-1))")
    g.add_argument("--train-size", type=int, default=None, help="stratified subsample of the training set")
    g = p.add_argument_group("methods and model")
    g.add_argument("--losses", default="ce,ce:label_smoothing=0.1,focal,gce,sce",
                   help="registry names with hyperparameters (gce:q=0.7), or cb / la / la_posthoc / forward_correction")
    g.add_argument("--model", default="mlp", choices=("linear", "mlp", "cnn"))
    g.add_argument("--hidden", default="100,100", help="MLP widths (default 100,100)")
    g.add_argument("--activation", default=None, choices=("relu", "tanh", "gelu"), help="MLP activation (default relu)")
    g.add_argument("--residual", default=None, action=argparse.BooleanOptionalAction,
                   help="MLP: h + act(W h) for hidden layers of equal width (default: off; on for --protocol mnist1d)")
    g = p.add_argument_group("training (a --protocol sets defaults; each flag overrides)")
    g.add_argument("--protocol", default="quick", choices=sorted(PROTOCOLS))
    for flag, kind in (("--optimizer", str), ("--lr", float), ("--momentum", float), ("--weight-decay", float),
                       ("--batch-size", int), ("--epochs", int), ("--steps", int), ("--eval-every", int),
                       ("--clip", float), ("--schedule", str)):
        g.add_argument(flag, type=kind, default=None)
    g.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    g.add_argument("--seed", type=int, default=None, help="first seed (default 0; 42 for --protocol mnist1d)")
    g.add_argument("--calibrate", action="store_true", help="fit a temperature on a held-out split and report both")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="results folder (default results/compare-DATASET)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bar, log lines only")


def compare_config(args):
    from .experiments.compare import CompareConfig
    from .experiments.methods import parse_list
    from .experiments.train import TrainConfig

    proto = dict(PROTOCOLS[args.protocol])
    seed0 = args.seed if args.seed is not None else proto.pop("seed", 0)
    proto.pop("seed", None)
    activation = args.activation or proto.pop("activation", "relu")
    proto.pop("activation", None)
    residual = proto.pop("residual", False) if args.residual is None else args.residual
    proto.pop("residual", None)
    for key in ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "steps", "eval_every", "clip",
                "schedule"):
        value = getattr(args, key)
        if value is not None:
            proto[key] = value
    epochs = proto.get("epochs", TrainConfig.epochs)
    fracs = proto.pop("milestones", ())
    proto["milestones"] = tuple(int(round(f * epochs)) for f in fracs)
    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    return CompareConfig(
        dataset=args.dataset,
        methods=parse_list(args.losses),
        model=args.model,
        hidden=_ints(args.hidden),
        activation=activation,
        residual=residual,
        noise=args.noise,
        noise_rates=_floats(args.noise_rate) if args.noise != "none" else (0.0,),
        imbalance=args.imbalance,
        train_size=args.train_size,
        seeds=tuple(range(seed0, seed0 + args.seeds)),
        calibrate=args.calibrate,
        val_fraction=args.val_fraction,
        train=TrainConfig(**proto),
    )


def cmd_compare(args, argv) -> int:
    from .experiments import compare, plots, report
    from .experiments.datasets import MissingDataError
    from .experiments.progress import Progress

    _threads(args.threads or 1)
    try:
        cfg = compare_config(args)
    except ValueError as e:
        print(f"crossent compare: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"results/compare-{cfg.dataset}")
    command = "crossent " + " ".join(shlex.quote(a) for a in argv)
    if not args.quiet:
        print(f"{command}\n-> {out}", file=sys.stderr)
    try:
        results = compare.run(cfg, make_progress=lambda total: Progress(total, "training", bar=not args.quiet))
    except (MissingDataError, ValueError) as e:
        print(f"crossent compare: {e}", file=sys.stderr)
        return 2
    paths = report.write(results, out, command)
    rows = report.aggregate(results["runs"])
    files = list(paths.values())
    if not args.no_plots:
        files += plots.write_all(results, rows, out)
    print(report.markdown_table(rows))
    print("\nwrote " + ", ".join(str(p) for p in files), file=sys.stderr)
    return 0


# -- entry point -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossent", description=__doc__)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (compare: default 1; bench: its own default)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("losses", help="list the registered losses")
    p.add_argument("--format", default="markdown", choices=("markdown", "json", "names"))
    p = sub.add_parser("bench", help="speed and memory of the linear + loss paths (crossent.bench.linear)",
                       add_help=False)
    p = sub.add_parser("compare", help="train a model with several losses and compare them")
    add_compare_arguments(p)
    return parser


def _split_bench(argv: list[str]):
    """``crossent [--threads N] bench ARGS...``: ARGS belong to the bench module's own parser."""
    i = 0
    while i < len(argv) and argv[i].startswith("--threads"):
        i += 1 if "=" in argv[i] else 2
    if i < len(argv) and argv[i] == "bench":
        return argv[: i + 1], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, bench_args = _split_bench(argv)
    args = build_parser().parse_args(head)
    args.bench_args = bench_args
    if args.command == "losses":
        return cmd_losses(args)
    if args.command == "bench":
        return cmd_bench(args)
    return cmd_compare(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

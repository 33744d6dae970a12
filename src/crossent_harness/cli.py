"""The ``crossent`` command: ``losses`` (the registry), ``bench`` (speed and memory), ``compare`` (losses on data),
``scaling`` (scaling-law fits).

Run ``crossent <command> --help`` for the options of each. A mistake on the command line ends the
command before any work with one line naming the option and exit status 2; ``--debug`` shows the
traceback of any error instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .argtypes import positive_int
from .text import HelpFormatter

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away) and help as plain text of at most
    100 columns (:class:`~crossent_harness.text.HelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# -- crossent losses ---------------------------------------------------------------------------------
def cmd_losses(args) -> int:
    from .experiments import catalog

    print(catalog.render(args.format))
    return 0


# -- crossent bench ----------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    try:
        from .bench import linear
    except ImportError as e:
        if "crossent_harness.bench" not in str(e) and "linear" not in str(e):
            raise
        raise UsageError(
            f"crossent bench needs the crossent_harness.bench.linear module, which this installation lacks ({e})"
        )
    parser = Parser(prog="crossent bench", description=linear.__doc__)
    linear.add_arguments(parser)
    bench_args = parser.parse_args(args.bench_args)
    if args.threads is not None and getattr(bench_args, "threads", None) is None:
        bench_args.threads = args.threads  # the global flag stands for the bench's own
    if hasattr(linear, "check_args"):
        try:
            linear.check_args(bench_args)
        except ValueError as e:
            raise UsageError(f"crossent bench: error: {e}") from None
    if getattr(bench_args, "dry_run", False):
        print(linear.plan(bench_args))
        return 0
    linear.run(bench_args)
    return 0


# -- crossent compare --------------------------------------------------------------------------------
def cmd_compare(args, argv) -> int:
    import torch

    from .experiments import compare, options, plots, report
    from .experiments.datasets import MissingDataError
    from .experiments.progress import Progress

    try:
        cfg, out = options.config_from_args(args)
    except ValueError as e:
        raise UsageError(f"crossent compare: error: {e}") from None
    if args.dry_run:
        print(options.plan(cfg, out))
        return 0
    torch.set_num_threads(args.threads or 1)
    command = "crossent " + " ".join(shlex.quote(a) for a in argv)
    if not args.quiet:
        print(f"{command}\n-> {out}", file=sys.stderr)
    def save_so_far(partial):  # an interrupted grid keeps the runs it finished
        report.write({**partial, "complete": False}, out, command)

    try:
        results = compare.run(cfg, make_progress=lambda total: Progress(total, "training", bar=not args.quiet),
                              on_record=save_so_far)
    except MissingDataError as e:
        raise UsageError(f"crossent compare: error: --dataset: {e}") from None
    except options.OptionError as e:  # a check that needed the loaded data (still before any training)
        raise UsageError(f"crossent compare: error: {e}") from None
    paths = report.write({**results, "complete": True}, out, command)
    rows = report.aggregate(results["runs"])
    files = list(paths.values())
    if not args.no_plots:
        files += plots.write_all(results, rows, out)
    print(report.markdown_table(rows))
    print("\nwrote " + ", ".join(str(p) for p in files), file=sys.stderr)
    return 0


# -- crossent scaling ----------------------------------------------------------------------------------
def cmd_scaling(args) -> int:
    from . import scaling_cli

    try:
        return scaling_cli.run(args)
    except scaling_cli.ScalingInputError as e:
        raise UsageError(f"crossent scaling {args.scaling_command}: error: {e}") from None


# -- entry point -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import scaling_cli
    from .experiments import catalog, options

    parser = Parser(prog="crossent", description=__doc__)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: 1 for compare; torch's own for bench)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    parser.commands = sub.choices  # name -> the command's parser, for its own error messages
    p = sub.add_parser("losses", help="list the registered losses with their hyperparameters and defaults",
                       description="Every registered loss: hyperparameters with defaults, formula, paper, streaming.")
    p.add_argument("--format", default="text", choices=catalog.FORMATS,
                   help="text (for a terminal, at most 100 columns), markdown (a table), json, or names (one a "
                   "line) (default: text)")
    sub.add_parser("bench", help="speed and memory of the linear + loss paths (crossent bench --help)", add_help=False)
    p = sub.add_parser("compare", help="train a model with several losses and compare them",
                       description="Train one model per loss (and noise rate, and seed) and compare test metrics.")
    options.add_arguments(p)
    p = sub.add_parser("scaling", help="fit scaling laws of the loss to runs (crossent scaling fit --help)",
                       description="Scaling laws of cross-entropy: L_inf + (x0/x)^alpha, E + A/N^alpha + B/D^beta.")
    scaling_cli.add_arguments(p)
    return parser


def _split_bench(argv: list[str]):
    """``crossent [--threads N] bench ARGS...``: ARGS belong to the bench module's own parser."""
    i = 0
    while i < len(argv) and argv[i].startswith("--") and argv[i] != "bench":
        i += 1 if "=" in argv[i] else 2
    if i < len(argv) and argv[i] == "bench":
        return argv[: i + 1], argv[i + 1 :]
    return argv, []


def _run(argv: list[str]) -> int:
    head, bench_args = _split_bench(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(head)
    if unknown:  # reported by the command's parser, whose options the user was writing
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.bench_args = bench_args
    if args.command == "losses":
        return cmd_losses(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "scaling":
        return cmd_scaling(args)
    return cmd_compare(args, argv)


def _quiet_broken_pipe() -> None:
    # The reader left (``crossent losses | head``): send what is still buffered nowhere, so that the
    # interpreter's final flush does not fail a second time.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line (``crossent compare ... --debug`` too)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_FAILURE
    except UsageError as e:
        if debug:
            raise
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print("crossent: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug shows the rest
        if debug:
            raise
        print(f"crossent: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())

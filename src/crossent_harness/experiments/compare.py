"""The experiment grid of ``crossent compare``: noise rates x seeds x methods, one training run each.

For each (noise rate, seed) the training labels are corrupted once and shared by every method, so
that methods are compared on identical data. Test labels are never corrupted. With ``calibrate``, a
stratified ``val_fraction`` of the (corrupted) training set is held out to fit a temperature, and the
correctness-aware calibrator of Liu et al. (2024) twice (its balanced objective and the unweighted one),
on the model's logits of transformed copies of the inputs (:mod:`.views`).

:func:`run` checks the whole grid (every method, the model, the noise definition: first all that needs no
data, then the noise definition on the loaded labels) before the first training step, so that a mistake
in the last method does not surface after the others have trained.
"""

from __future__ import annotations

import time

import torch

from ..records import provenance
from . import datasets, layout, metrics, noise, subsets, views
from .config import CompareConfig, OptionError, as_option
from .methods import Context, Method
from .models import build_model
from .train import predict, train


def _val_split(y: torch.Tensor, fraction: float, seed: int):
    g = torch.Generator().manual_seed(10_000 + seed)
    tr, va = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        va.append(idx[:k])
        tr.append(idx[k:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


def prepare_data(cfg: CompareConfig):
    """Load the dataset, lay it out as the protocol asks, and apply the imbalance and subsampling (all
    seed-independent)."""
    data = layout.apply(datasets.load(cfg.dataset), cfg.split, cfg.scaling)
    x, y = data.x_train, data.y_train
    if cfg.imbalance:
        keep = subsets.long_tail_indices(y, data.num_classes, cfg.imbalance, seed=0)
        x, y = x[keep], y[keep]
    if cfg.train_size:
        keep = subsets.stratified_subsample(y, cfg.train_size, seed=0)
        x, y = x[keep], y[keep]
    return data, x, y


def corrupt(cfg: CompareConfig, data, y: torch.Tensor, rate: float, seed: int):
    """Noisy training labels and the true transition matrix (``None`` without noise; the identity at rate 0)."""
    if cfg.noise == "none":
        return y.clone(), None
    if rate == 0:
        return y.clone(), torch.eye(data.num_classes, dtype=torch.float64)
    model = noise.get(cfg.noise)
    noisy = model.corrupt(y, data.num_classes, rate, seed=seed, pairs=data.pairs)
    return noisy, model.transition(y, data.num_classes, rate, pairs=data.pairs)


def check_data(cfg: CompareConfig, data, y_train: torch.Tensor) -> None:
    """:class:`~.config.OptionError` for the checks that need the loaded data, after the others
    (:meth:`CompareConfig.check`): every class keeps a training example (a long tail as steep as
    ``--imbalance 1e6`` leaves none of the last classes), and the noise definition takes these training
    labels (``apl-symmetric`` flips as many labels in every class, which a long tail or a small
    subsample may not have)."""
    counts = torch.bincount(y_train, minlength=data.num_classes)
    if cfg.imbalance and not bool((counts > 0).all()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        most = int(counts.max())
        raise OptionError("--imbalance", f"{cfg.imbalance:g} leaves {len(empty)} of {data.num_classes} classes "
                          f"without a training example; the head class keeps {most}, so at most {most} keeps one "
                          "of each")
    if cfg.noise == "none":
        return
    model = noise.get(cfg.noise)
    for rate in cfg.noise_rates:
        if rate:
            as_option("--noise", model.check, y_train, data.num_classes, rate, data.pairs)


def run(cfg: CompareConfig, make_progress=None, on_record=None) -> dict:
    """Run the grid; returns ``{"config", "dataset", "n_train", "provenance", "runs": [...]}`` (one record
    per training run; ``provenance``: :func:`crossent_harness.records.provenance`, the commit, torch, CPU
    and threads the runs had).

    ``make_progress(total_steps)`` may return a :class:`~crossent_harness.experiments.progress.Progress`;
    ``on_record(results_so_far)`` is called after every training run (to save what is done so far).
    """
    cfg.check()
    data, x_all, y_all = prepare_data(cfg)
    check_data(cfg, data, y_all)
    progress = make_progress(total_steps(cfg, len(y_all))) if make_progress is not None else None
    head = {"config": cfg.to_dict(), "dataset": repr(data), "n_train": len(y_all), "provenance": provenance()}
    try:
        return _grid(cfg, data, x_all, y_all, progress, head, on_record)
    finally:
        if progress is not None:
            progress.close()


def _grid(cfg, data, x_all, y_all, progress, head: dict, on_record=None) -> dict:
    rates = cfg.noise_rates if cfg.noise != "none" else (0.0,)
    runs = []
    for rate in rates:
        for seed in cfg.seeds:
            noisy_all, true_t = corrupt(cfg, data, y_all, rate, seed)
            if cfg.calibrate:
                tr, va = _val_split(noisy_all, cfg.val_fraction, seed)
            else:
                tr, va = torch.arange(len(y_all)), torch.arange(0)
            x, y = x_all[tr], noisy_all[tr]
            counts = torch.bincount(y, minlength=data.num_classes)
            fitted: dict = {}

            def fit_ce():
                # the CE model that forward correction estimates T from (trained once per rate/seed)
                if "probs" not in fitted:
                    torch.manual_seed(seed)
                    model = build_model(cfg.model, data.input_shape, data.num_classes, hidden=cfg.hidden,
                                        activation=cfg.activation, residual=cfg.residual, init=cfg.init)
                    train(model, x, y, Method("ce", "ce").prepare(ctx), cfg.train, seed=seed)
                    fitted["probs"] = torch.softmax(predict(model, x).double(), -1)
                return fitted["probs"]

            ctx = Context(counts, data.num_classes, true_t, fit_ce, y, num_train=len(y))
            for method in cfg.methods:
                runs.append(_one_run(cfg, data, method, ctx, x, y, x_all[va], noisy_all[va], rate, seed,
                                     y_all[tr], progress))
                if on_record is not None:
                    on_record({**head, "runs": runs})
    return {**head, "runs": runs}


def _one_run(cfg, data, method, ctx, x, y, x_val, y_val, rate, seed, y_clean, progress) -> dict:
    t0 = time.time()
    prepared = method.prepare(ctx)
    torch.manual_seed(seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes, hidden=cfg.hidden, activation=cfg.activation,
                        residual=cfg.residual, init=cfg.init)
    history = train(
        model, x, y, prepared, cfg.train, seed=seed, eval_data=(data.x_test, data.y_test),
        on_step=progress.advance if progress is not None else None,
    )
    adjust = prepared.adjust or (lambda z: z)
    logits = adjust(predict(model, data.x_test)).double()
    record = {
        "method": method.label,
        "noise": cfg.noise,
        "rate": rate,
        "seed": seed,
        "actual_noise": (y != y_clean).double().mean().item(),
        **metrics.all_metrics(logits, data.y_test, cfg.n_bins),
        "reliability": metrics.reliability_bins(logits, data.y_test, cfg.n_bins),
        "info": {k: v for k, v in prepared.info.items()},
    }
    if history:
        best = max(history, key=lambda h: h["test_acc"])
        record.update(best_acc=best["test_acc"], best_step=best["step"], history=history)
    if cfg.calibrate and len(y_val):
        from crossent.calibration import TemperatureScaling

        ts = TemperatureScaling().fit(adjust(predict(model, x_val)), y_val)
        scaled = ts(logits)
        m = metrics.all_metrics(scaled, data.y_test, cfg.n_bins)
        record.update(temperature=ts.temperature, nll_ts=m["nll"], ece_ts=m["ece"])
        record["reliability_ts"] = metrics.reliability_bins(scaled, data.y_test, cfg.n_bins)
        record.update(_correctness_aware(cfg, data, model, adjust, x_val, y_val, logits, seed))
    record["seconds"] = time.time() - t0
    if progress is not None:
        extra = f" best {record['best_acc']:.4f}@{record['best_step']}" if history else ""
        ts_txt = f" ece_ts {record['ece_ts'] * 100:.2f}% T {record['temperature']:.2f}" if "ece_ts" in record else ""
        ts_txt += f" ece_ca {record['ece_ca'] * 100:.2f}%" if "ece_ca" in record else ""
        progress.log(
            f"{method.label:<24} {'clean' if rate == 0 else f'rate {rate:g}':<9} seed {seed}: acc {record['acc']:.4f} bacc {record['bacc']:.4f} "
            f"nll {record['nll']:.3f} ece {record['ece'] * 100:.2f}%{ts_txt}{extra} ({record['seconds']:.0f}s)"
        )
    return record


def _correctness_aware(cfg, data, model, adjust, x_val, y_val, test_logits, seed) -> dict:
    """ECE, NLL and reliability bins on the test set after the correctness-aware calibrator, fitted on the
    held-out rows with its balanced objective (``*_ca``, the official code's) and the unweighted one
    (``*_ca_plain``, the unweighted squared gap)."""
    from crossent.calibration import CorrectnessAwareCalibrator

    def view_logits(x, view_seed):
        return torch.stack([adjust(predict(model, v)) for v in views.transformed(x, data.kind, view_seed)], 1)

    val_logits, val_views = adjust(predict(model, x_val)), view_logits(x_val, 20_000 + seed)
    test_views = view_logits(data.x_test, 30_000 + seed)
    out = {}
    for suffix, balanced in (("ca", True), ("ca_plain", False)):
        calibrator = CorrectnessAwareCalibrator(views.COUNT, top_k=min(4, data.num_classes)).fit(
            val_logits, val_views, y_val, balanced=balanced, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            scaled = calibrator(test_logits, test_views)
        m = metrics.all_metrics(scaled, data.y_test, cfg.n_bins)
        out.update({f"ece_{suffix}": m["ece"], f"nll_{suffix}": m["nll"],
                    f"reliability_{suffix}": metrics.reliability_bins(scaled, data.y_test, cfg.n_bins)})
    return out


def total_steps(cfg: CompareConfig, n_train: int) -> int:
    """Optimizer steps of the whole grid (for the progress bar; forward correction's CE model excluded)."""
    n = n_train - (int(round(cfg.val_fraction * n_train)) if cfg.calibrate else 0)
    rates = cfg.noise_rates if cfg.noise != "none" else (0.0,)
    return len(rates) * len(cfg.seeds) * len(cfg.methods) * cfg.train.total_steps(n)

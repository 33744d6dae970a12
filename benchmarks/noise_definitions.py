"""How many training labels each noise definition changes, on the datasets of docs/results.md.

For every definition and rate: the share of labels that change (one seed), the share the definition
implies (from its transition matrix and the class counts), and the largest gap between the empirical
and the implied transition matrix. Prints a Markdown table.

    python benchmarks/noise_definitions.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

from crossent_harness.experiments import datasets, layout, noise, protocols  # noqa: E402

SETTINGS = (("digits", "default", None, (0.4,)), ("letter", "random:2000", "minmax", (0.3, 0.6)))


def main() -> str:
    lines = ["| dataset | definition | rate | labels changed % (seed 0) | implied % | max abs T gap |",
             "|---|---|---:|---:|---:|---:|"]
    for name, split, scaling, rates in SETTINGS:
        try:
            data = layout.apply(datasets.load(name), split, scaling)
        except datasets.MissingDataError:
            continue
        y, c = data.y_train, data.num_classes
        counts = torch.bincount(y, minlength=c).double()
        for model in noise.MODELS.values():
            for rate in rates:
                try:
                    t = model.transition(y, c, rate, pairs=data.pairs)
                except ValueError:
                    continue  # e.g. the 10-class APL map on Letter
                noisy = model.corrupt(y, c, rate, seed=0, pairs=data.pairs)
                implied = float((counts * (1 - t.diagonal())).sum() / counts.sum())
                gap = (noise.empirical_transition(y, noisy, c) - t).abs().max().item()
                lines.append(f"| {name} ({len(y)} training labels) | `{model.name}` | {rate:g} | "
                             f"{100 * noise.flip_rate(y, noisy):.2f} | {100 * implied:.2f} | {gap:.3f} |")
    assert protocols.get("ldr").data_for("letter")["split"] == "random:2000"  # the layout used above
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())

"""Train a small classifier on scikit-learn's bundled digits with a few crossent losses.

Runs offline in a few seconds: ``make demo``.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import crossent as xe


def train(loss, x_train, y_train, x_test, y_test, *, epochs: int = 30, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    crit = xe.nn.CrossEntropyLoss(loss=loss)
    for _ in range(epochs):
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            crit(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        logits = model(x_test)
        acc = (logits.argmax(-1) == y_test).float().mean().item()
        nll = torch.nn.functional.cross_entropy(logits, y_test).item()
    return acc, nll


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    losses = {
        "ce": xe.losses.CrossEntropy(),
        "ce, label smoothing 0.1": xe.losses.CrossEntropy(label_smoothing=0.1),
        "ce + z-loss 1e-2": xe.losses.CrossEntropy() + xe.losses.ZLoss(1e-2),
    }
    print(f"{'loss':<28} {'test acc':>9} {'test NLL':>9}")
    for name, loss in losses.items():
        acc, nll = train(loss, x_train, y_train, x_test, y_test)
        print(f"{name:<28} {acc:>9.4f} {nll:>9.4f}")


if __name__ == "__main__":
    main()

"""Post-hoc calibration: temperature scaling (Guo et al., *On Calibration of Modern Neural Networks*, ICML 2017).

One scalar ``T > 0`` is fitted on held-out logits by minimising the NLL of ``softmax(z / T)``; it changes
confidences, never the predicted class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class TemperatureScaling:
    r"""Fit a temperature on held-out logits, then divide logits by it.

    The NLL :math:`\frac1N\sum_i -\log \mathrm{softmax}(z_i / T)_{y_i}` is minimised over
    :math:`\log T` (so that :math:`T` stays positive) with L-BFGS and a strong-Wolfe line search,
    in float64.

    Args:
        max_iter: L-BFGS iterations. Default ``100``.

    Attributes:
        temperature: the fitted :math:`T` (``1.0`` before :meth:`fit`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> z = 3 * torch.randn(20000, 5, generator=g)            # a model's logits
        >>> y = torch.multinomial(torch.softmax(z / 2.0, -1), 1, generator=g).squeeze(1)
        >>> ts = TemperatureScaling().fit(z, y)                     # labels drawn at temperature 2
        >>> round(ts.temperature, 1)
        2.0
        >>> ts(torch.tensor([[4.0, 0.0]])).round(decimals=1)
        tensor([[2., 0.]])
    """

    def __init__(self, max_iter: int = 100):
        self.max_iter = int(max_iter)
        self.temperature = 1.0

    def fit(self, logits: Tensor, labels: Tensor) -> TemperatureScaling:
        """Fit :attr:`temperature` to ``logits [N, C]`` and class indices ``labels [N]``; returns ``self``."""
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise TypeError("labels must be integer class indices")
        finite = torch.isfinite(logits.detach())
        if not finite.all():
            row, col = (int(i) for i in (~finite).nonzero()[0])
            raise ValueError(f"logits must be finite to fit a temperature; logits[{row}, {col}] = {logits[row, col].item()}")
        z = logits.detach().double()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), labels)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.temperature = float(log_t.detach().exp())
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        """``logits / temperature``."""
        return logits / self.temperature

    def __repr__(self) -> str:
        return f"TemperatureScaling(temperature={self.temperature:.4g})"


__all__ = ["TemperatureScaling"]

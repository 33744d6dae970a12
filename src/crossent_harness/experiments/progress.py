"""Progress reporting: a rich (or tqdm) bar when available and wanted, plain log lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "training", bar=True) as p: p.advance(k); p.log("...")``.

    ``bar=False`` (``--quiet``) prints only the log lines. rich and tqdm are imported here, lazily; with
    neither installed a percentage line is printed every 10 %.
    """

    def __init__(self, total: int, description: str = "", bar: bool = True, stream=None):
        self.total = max(int(total), 1)
        self.description = description
        self.stream = stream or sys.stderr
        self.done = 0
        self._kind = None
        self._impl = None
        self._next_pct = 10
        self._t0 = time.time()
        if bar:
            self._kind = self._open()

    def _open(self):
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TimeElapsedColumn
            from rich.progress import TextColumn, TimeRemainingColumn

            self._impl = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), transient=False,
            )
            self._impl.start()
            self._task = self._impl.add_task(self.description, total=self.total)
            return "rich"
        except ImportError:
            pass
        try:
            from tqdm import tqdm

            self._impl = tqdm(total=self.total, desc=self.description, file=self.stream)
            return "tqdm"
        except ImportError:
            return "plain"

    def advance(self, k: int = 1) -> None:
        self.done += k
        if self._kind == "rich":
            self._impl.advance(self._task, k)
        elif self._kind == "tqdm":
            self._impl.update(k)
        elif self._kind == "plain":
            pct = 100 * self.done / self.total
            if pct >= self._next_pct:
                print(f"{self.description}: {pct:.0f}% ({time.time() - self._t0:.0f}s)", file=self.stream, flush=True)
                while self._next_pct <= pct:
                    self._next_pct += 10

    def log(self, message: str) -> None:
        if self._kind == "rich":
            self._impl.console.print(message, markup=False, highlight=False, soft_wrap=True)
        elif self._kind == "tqdm":
            self._impl.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._kind in ("rich",):
            self._impl.stop()
        elif self._kind == "tqdm":
            self._impl.close()
        self._kind = None if self._kind in ("rich", "tqdm") else self._kind

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

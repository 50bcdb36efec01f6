"""Progress of work that takes seconds, and one-line notices: the helpers every layer uses (this module
imports nothing of pixformer).

    with Progress(len(data), "validating") as progress:
        for batch in batches:
            ...
            progress.update(len(batch))

On a terminal (stderr is a tty): a tqdm bar, drawn once the work has taken `delay` seconds, so work
that ends sooner says nothing. Anywhere else (a log file, a pipe, a scheduler's output, torchrun): a
plain line every `every` seconds and never a carriage return,

    validating: 3,000/5,000 images (60 %), 410 img/s, about 5 s left

then a last line when the work ends, if any line was said. `show=False` says nothing at all (a run's
`progress=False`, the ranks other than 0). Extra facts (`update(n, loss="0.412")`) go on the bar or
at the end of the line. PIXFORMER_PROGRESS_EVERY sets the seconds between plain lines (default 10).
"""
from __future__ import annotations

import os
import sys
import time

DELAY = 1.0         # seconds before a bar is drawn
_SAID: set[str] = set()


def notice(message: str, once: bool = False) -> None:
    """Say one line to the user on stderr (so that --json output stays clean); under torchrun rank 0
    alone speaks. `once`: a message said before in this process is not said again."""
    if os.environ.get("RANK", "0") != "0" or (once and message in _SAID):
        return
    _SAID.add(message)
    print(message, file=sys.stderr, flush=True)


def every_default() -> float:
    """Seconds between plain lines: PIXFORMER_PROGRESS_EVERY (a number), or 10."""
    try:
        return max(float(os.environ.get("PIXFORMER_PROGRESS_EVERY") or 10.0), 0.0)
    except ValueError:
        return 10.0


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.2g}"


class Progress:
    """`total` units of work described by `desc`: a bar on a terminal, plain periodic lines elsewhere
    (see the module doc). `unit` names the work in lines ("images"), `short` in rates ("img/s");
    `initial` units were done before (a resumed run); `leave` keeps a finished bar on the terminal."""

    def __init__(self, total: int, desc: str, unit: str = "images", short: str = "img", every: float | None = None,
                 show: bool = True, initial: int = 0, leave: bool = False, delay: float = DELAY):
        self.total, self.desc, self.unit, self.short = total, desc, unit, short
        self.every = every_default() if every is None else every
        self.done = self.initial = initial
        self.t0 = self.last = time.monotonic()
        self.info: dict[str, object] = {}
        self.said = None                    # the count of the last plain line printed
        self.closed = not show
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=short, leave=leave, delay=delay,
                            dynamic_ncols=True)

    def update(self, n: int = 1, **info) -> None:
        """`n` more units done; `info` (name=value) is shown beside the count."""
        if self.closed:
            return
        self.done += n
        if info:
            self.info = info
        if self.bar is not None:
            if info:
                self.bar.set_postfix(info, refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every:
            self.say()

    def line(self) -> str:
        """The plain line of the work so far."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self.initial) / elapsed
        text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}"
        if self.total:
            text += f" ({100 * self.done // self.total} %)"
        text += f", {_rate(rate)} {self.short}/s"
        if 0 < self.done < self.total and rate > 0 and (self.total - self.done) / rate >= 1:
            text += f", about {_duration((self.total - self.done) / rate)} left"
        elif self.done >= self.total:
            text += f", {_duration(elapsed)}"
        return text + "".join(f", {k} {v}" for k, v in self.info.items())

    def say(self) -> None:
        self.last = time.monotonic()
        self.said = self.done
        print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the bar, or say the last line if any was said and the count moved since (at most once;
        later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.said is not None and self.said != self.done:
            self.say()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

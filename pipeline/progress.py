"""Per-stage progress of a pipeline run, for a person to read.

One line per stage: its name, recordings done / to do, audio hours done, rate and ETA. On a
terminal the lines are tqdm bars updated in place; otherwise (a log file, a pipe, CI) plain lines
are printed every ``interval`` seconds for the stages that moved, and once when a stage finishes.

The runner feeds it from the part files that stage workers write (every finished batch is one
part with the verdict of each recording and the audio duration it covered), so it needs nothing
from inside the Ray workers and works the same on a cluster.

"To do" shrinks while the run goes: a recording rejected at VAD will never reach ASR, so a stage's
to-do count is the recordings that enter the pipeline at or before it minus those that left it
upstream during this run.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class StageTally:
    name: str
    planned: int  # recordings that enter the pipeline at or before this stage
    done: set = field(default_factory=set)
    exits: int = 0  # recordings this stage rejected or failed (they go no further)
    audio_seconds: float = 0.0
    first_seen: float | None = None  # wall time of this stage's first finished batch

    def line(self, todo: int, finished: bool, started: float | None, now: float) -> str:
        n = len(self.done)
        parts = [f"{self.name:<15} {n:>{len(str(todo))}}/{todo} rec", f"{self.audio_seconds / 3600:.3f} audio h"]
        if finished:
            parts.append("done")
        elif n and started is not None and now > started:
            rate = n / (now - started)
            parts.append(f"{rate * 60:.1f} rec/min")
            parts.append(f"ETA {_clock(max(todo - n, 0) / rate)}")
        elif todo:
            parts.append("waiting" if started is None else "working")
        return "  ".join(parts)


class Progress:
    """``mode``: "tty" (bars in place), "plain" (periodic lines), "off" or "auto" (tty when the
    stream is a terminal). ``poll`` is called from a background thread before each refresh; it
    reports finished batches through :meth:`record`."""

    def __init__(self, names: list[str], planned: list[int], *, mode: str = "auto",
                 stream: TextIO | None = None, interval: float | None = None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "tty" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode = mode
        self.interval = interval if interval is not None else (0.5 if mode == "tty" else 30.0)
        self.stages = [StageTally(n, p) for n, p in zip(names, planned)]
        self.t0 = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll: Callable[[], None] | None = None
        self._bars: list = []
        self._printed: list[tuple[int, bool]] = [(-1, False)] * len(self.stages)

    # ------------------------------------------------------------------ state

    def record(self, index: int, outcomes: dict[str, str], audio_seconds: float) -> None:
        """A finished batch of stage ``index``: recording id -> status, audio it covered."""
        with self._lock:
            st = self.stages[index]
            if st.first_seen is None:
                st.first_seen = time.time()
            for rid, status in outcomes.items():
                if rid not in st.done:
                    st.done.add(rid)
                    if status != "ok":
                        st.exits += 1
            st.audio_seconds += audio_seconds

    def todo(self, index: int) -> int:
        return self.stages[index].planned - sum(s.exits for s in self.stages[:index])

    def finished(self, index: int) -> bool:
        return all(len(s.done) >= self.todo(i) for i, s in enumerate(self.stages[: index + 1]))

    def _started(self, index: int) -> float | None:
        """When the stage could start working: at the start for the first stage and for stages
        where resumed recordings enter, else when its upstream finished its first batch."""
        if index == 0 or self.stages[index].planned > self.stages[index - 1].planned:
            return self.t0
        return self.stages[index - 1].first_seen

    def lines(self) -> list[str]:
        now = time.time()
        with self._lock:
            return [s.line(self.todo(i), self.finished(i), self._started(i), now) for i, s in enumerate(self.stages)]

    # ------------------------------------------------------------------ display

    def start(self, poll: Callable[[], None] | None = None) -> "Progress":
        self._poll = poll
        if self.mode == "off":
            return self
        if self.mode == "tty":
            from tqdm.auto import tqdm

            # A terminal that reports no size (some pseudo-terminals) would hide or truncate the lines.
            size = shutil.get_terminal_size((0, 0))
            known = size.columns > 0 and size.lines > 0
            self._bars = [tqdm(total=0, position=i, bar_format="{desc}", leave=True, file=self.stream,
                               dynamic_ncols=known, ncols=None if known else 120,
                               nrows=None if known else len(self.stages) + 1)
                          for i in range(len(self.stages))]
        self._thread = threading.Thread(target=self._loop, name="pipeline-progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        # Poll often (timestamps of finished batches set the rates), print every `interval`.
        step = min(self.interval, 1.0)
        next_render = time.monotonic() + self.interval
        while not self._stop.wait(step):
            self._poll_safely()
            if time.monotonic() >= next_render:
                self._render(final=False)
                next_render += self.interval

    def _poll_safely(self) -> None:
        if self._poll is not None:
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - progress must never break a run
                pass

    def _render(self, final: bool) -> None:
        lines = self.lines()
        if self.mode == "tty":
            for bar, text in zip(self._bars, lines):
                bar.set_description_str(text, refresh=True)
            return
        if self.mode != "plain":
            return
        elapsed = _clock(time.time() - self.t0)
        out = []
        for i, text in enumerate(lines):
            state = (len(self.stages[i].done), self.finished(i))
            if state != self._printed[i] and (state[0] > 0 or final):
                out.append(f"[progress {elapsed}] {text}")
                self._printed[i] = state
        if out:
            print("\n".join(out), file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the refresh thread and show the final state."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.mode == "off":
            return
        self._poll_safely()
        self._render(final=True)
        for bar in self._bars:
            bar.close()
        self._bars = []


def say(msg: str) -> None:
    """One line of the pipeline's own console output (the summary, scaling notes)."""
    print(f"[pipeline] {msg}", flush=True)

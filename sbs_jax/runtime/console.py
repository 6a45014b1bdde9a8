"""What our CLIs print: time-stamped lines (`say`, and `LogFormatter` for those that log through
`logging`), a decoding progress display, and the training throughput that leaves compilation out.

Every batch shape the train step has not seen compiles it again, which takes seconds to minutes;
a throughput or ETA that averaged those steps in would swing by orders of magnitude. So steps
that compiled are timed apart (`CompileClock` sees jax's compile events), reported as
`compile 12.3s`, and left out of tokens/s and of the time per step behind the ETA.

jax is imported where it is used, so the data and teacher CLIs, which never start it, can
time-stamp their lines without loading it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Self, TextIO, TypeVar

T = TypeVar("T")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # local time, the same on every CLI's lines
# jax reports tracing, lowering and XLA compilation as duration events under this prefix.
_COMPILE_EVENT_PREFIX = "/jax/core/compile/"


def timestamp(when: float | None = None) -> str:
    return time.strftime(TIME_FORMAT, time.localtime(when))


def say(message: str, file: TextIO | None = None) -> None:
    """Prints `message` after the current time (stdout unless `file`), flushed at once."""
    print(f"{timestamp()} {message}", file=file or sys.stdout, flush=True)


class LogFormatter(logging.Formatter):
    """`logging` records as `say` prints lines: the same time prefix (no milliseconds)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s or 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds) // 60
    if minutes < 60:
        return f"{minutes}m{int(seconds) % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def format_metrics(metrics: Mapping[str, float]) -> str:
    """`accuracy 78.12%, num_examples 200`: our metric_fns return accuracies in percent."""
    parts = []
    for name, value in metrics.items():
        if "accuracy" in name:
            parts.append(f"{name} {value:.2f}%")
        elif float(value).is_integer():
            parts.append(f"{name} {int(value)}")
        else:
            parts.append(f"{name} {value:.4g}")
    return ", ".join(parts)


class CompileClock:
    """Seconds jax has spent tracing, lowering and compiling on the thread that entered it.

    Other threads (an async checkpoint writer, say) are not counted, so a difference of
    `seconds` around a call says whether that call compiled.
    """

    def __init__(self):
        self.seconds = 0.0
        self._thread = threading.get_ident()

    def _listen(self, event: str, duration: float, **_) -> None:
        if event.startswith(_COMPILE_EVENT_PREFIX) and threading.get_ident() == self._thread:
            self.seconds += duration

    def __enter__(self) -> Self:
        import jax

        self._thread = threading.get_ident()
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listen)


class Throughput:
    """Tokens/s over the steps that did not compile, and the time per step an ETA needs.

    The loop reports each step's tokens (`add`), the wall time to leave out (`exclude`:
    compiling steps, evaluation, checkpoint writes) and, of that, what still recurs with the
    steps (`overhead`: checkpoint writes, spread over the steps in `step_s`); `window()` gives
    tokens/s since the previous call.
    """

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._start = clock()
        self._tokens = self._steps = 0
        self._excluded = 0.0
        self.total_tokens = self.total_steps = 0
        self.total_s = 0.0
        self.overhead_s = 0.0

    def add(self, steps: int, tokens: int) -> None:
        self._steps += steps
        self._tokens += tokens

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def overhead(self, seconds: float) -> None:
        self.overhead_s += seconds

    def window(self) -> float | None:
        """Tokens/s since the last window (None when no timed step finished in it)."""
        now = self._clock()
        elapsed = now - self._start - self._excluded
        tokens, steps = self._tokens, self._steps
        self._start, self._tokens, self._steps, self._excluded = now, 0, 0, 0.0
        if not steps or elapsed <= 0:
            return None
        self.total_tokens += tokens
        self.total_steps += steps
        self.total_s += elapsed
        return tokens / elapsed

    @property
    def tokens_per_s(self) -> float | None:
        return self.total_tokens / self.total_s if self.total_s else None

    @property
    def step_s(self) -> float | None:
        """Seconds per step, checkpoint writes included."""
        if not self.total_steps:
            return None
        return (self.total_s + self.overhead_s) / self.total_steps


def eta_seconds(step: int, total_steps: int, step_s: float | None, eval_period: int,
                eval_s: float | None) -> float | None:
    """Time to `total_steps`: the remaining steps at `step_s`, plus the evaluations still due
    (every `eval_period` steps and at the end) at `eval_s` each."""
    if step_s is None:
        return None
    remaining = max(total_steps - step, 0) * step_s
    if eval_period > 0 and eval_s is not None and step < total_steps:
        evals = total_steps // eval_period - step // eval_period
        evals += total_steps % eval_period != 0  # the final evaluation
        remaining += evals * eval_s
    return remaining


@dataclasses.dataclass
class Timing:
    """Seconds a block took, its compilation apart: `2.1s, compile 5.6s`."""

    seconds: float = 0.0
    compile_s: float = 0.0

    def __str__(self) -> str:
        text = format_duration(self.seconds)
        return text + (f", compile {self.compile_s:.1f}s" if self.compile_s else "")


class StepTimer:
    """Times the train steps of one run: `run` each step through it, wrap evaluation in
    `evaluation()` and checkpoint writes in `saving()`, take each progress line's figures from
    `window()`. Enter it (on the loop's
    thread) for the compile events to be seen.

    A step whose batch shapes are new first waits for the previous steps, so its compilation
    is timed alone; a step that compiled (jax's events say so, whatever the shapes) is waited
    for and left out of the throughput, the call's duration counted as compile time. Compiling
    elsewhere between steps (the first checkpoint write compiles its slicing programs) is
    taken out of the throughput and counted too.
    """

    def __init__(self):
        self.clock = CompileClock()
        self.throughput = Throughput()
        self.compile_s = 0.0        # compilation outside evaluation
        self.compiles = 0           # train steps that compiled
        self.eval_compile_s = 0.0   # compilation during evaluations
        self.eval_s: float | None = None  # the last evaluation, its compilation left out
        self._eval_step: int | None = None
        self._attributed = 0.0      # clock seconds already accounted for
        self._unreported_s = 0.0
        self._shapes: set = set()

    def __enter__(self) -> Self:
        self.clock.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.clock.__exit__(*exc)

    def _count_compile(self, seconds: float) -> None:
        self.compile_s += seconds
        self._unreported_s += seconds

    def _settle(self) -> None:
        """Takes compilation since the last accounting out of the throughput."""
        stray = self.clock.seconds - self._attributed
        if stray > 0:
            self.throughput.exclude(stray)
            self._count_compile(stray)
        self._attributed = self.clock.seconds

    def run(self, step_fn: Callable, state: Any, batch: Any, tokens: int) -> Any:
        """`step_fn(state, batch)`, timed; `tokens` = the real tokens of the batch."""
        import jax

        self._settle()
        leaves, tree = jax.tree.flatten(batch)
        shapes = (tree, tuple(getattr(x, "shape", None) for x in leaves))
        if shapes not in self._shapes:
            self._shapes.add(shapes)
            jax.block_until_ready(state)
        start = time.perf_counter()
        out = step_fn(state, batch)
        call_s = time.perf_counter() - start
        if self.clock.seconds == self._attributed:
            self.throughput.add(1, tokens)
            return out
        jax.block_until_ready(out)
        self.throughput.exclude(time.perf_counter() - start)
        self._attributed = self.clock.seconds
        self.compiles += 1
        self._count_compile(call_s)
        return out

    @contextlib.contextmanager
    def evaluation(self, step: int) -> Iterator[Timing]:
        """Leaves the block out of the throughput and times it for the ETA, less compilation;
        the blocks of one step (one per split) add up to that step's evaluation time. The
        `Timing` it yields is filled in when the block ends."""
        self._settle()
        took = Timing()
        start = time.perf_counter()
        yield took
        elapsed = time.perf_counter() - start
        took.compile_s = self.clock.seconds - self._attributed
        took.seconds = max(elapsed - took.compile_s, 0.0)
        self._attributed = self.clock.seconds
        self.throughput.exclude(elapsed)
        self.eval_compile_s += took.compile_s
        same_step = self._eval_step == step and self.eval_s is not None
        self.eval_s = took.seconds + (self.eval_s if same_step else 0.0)
        self._eval_step = step

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Leaves a checkpoint write out of tokens/s (its compilation counted apart); the rest
        of its time goes into the time per step of the ETA."""
        self._settle()
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        compiled = self.clock.seconds - self._attributed
        self._attributed = self.clock.seconds
        self._count_compile(compiled)
        self.throughput.exclude(elapsed)
        self.throughput.overhead(max(elapsed - compiled, 0.0))

    def window(self) -> tuple[float | None, float]:
        """(tokens/s, compile seconds outside evaluation) since the previous call."""
        self._settle()
        seconds, self._unreported_s = self._unreported_s, 0.0
        return self.throughput.window(), seconds

    def eta_s(self, step: int, total_steps: int, eval_period: int) -> float | None:
        return eta_seconds(step, total_steps, self.throughput.step_s, eval_period, self.eval_s)


class Progress:
    """Progress of a long loop (evaluation decoding): a tqdm bar on stderr when it is a
    terminal, otherwise a time-stamped line every `every_s` seconds; silent when not `enabled`
    (processes other than 0)."""

    def __init__(self, total: int, description: str, unit: str = "examples",
                 every_s: float = 30.0, enabled: bool = True):
        self.total, self.description, self.unit = total, description, unit
        self.every_s, self.done = every_s, 0
        self._start = self._last = time.perf_counter()
        self._bar = None
        if not enabled:
            self._mode = "off"
        elif sys.stderr.isatty():
            from tqdm import tqdm

            self._mode = "bar"
            # A terminal that reports no size (0 x 0) would get no bar at all.
            columns, lines = shutil.get_terminal_size()
            self._bar = tqdm(total=total, desc=description, unit=unit.rstrip("s") or unit,
                             file=sys.stderr, leave=False, ncols=columns, nrows=lines)
        else:
            self._mode = "lines"
            say(f"{description}: {total:,} {unit}")

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self._mode == "lines":
            now = time.perf_counter()
            if now - self._last >= self.every_s and self.done < self.total:
                self._last = now
                rate = self.done / max(now - self._start, 1e-9)
                left = format_duration((self.total - self.done) / rate) if rate else "-"
                say(f"{self.description}: {self.done:,}/{self.total:,} {self.unit} "
                    f"({100 * self.done / max(self.total, 1):.0f}%), {rate:,.1f}/s, ETA {left}")

    def track(self, items: Iterable[T], count: Callable[[T], int]) -> Iterator[T]:
        """Yields `items`, counting `count(item)` once each is handled; closes at the end."""
        try:
            for item in items:
                yield item
                self.update(count(item))
        finally:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

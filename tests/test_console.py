"""Console lines: time stamps, percent accuracies, progress (a bar or lines), and throughput
and ETA figures that leave compilation out."""

import os
import pty
import re
import select
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO_ROOT

from sbs_jax.runtime import console

STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def test_say_stamps_each_line_and_metrics_show_percent(capsys):
    console.say("eval step 6 (valid): " + console.format_metrics(
        {"accuracy": 0.78125, "num_examples": 16.0, "loss": 1.23456}))
    line = capsys.readouterr().out
    assert STAMPED.match(line)
    assert line.endswith("eval step 6 (valid): accuracy 0.78%, num_examples 16, loss 1.235\n")


def test_durations_read_in_seconds_minutes_or_hours():
    assert [console.format_duration(s) for s in (12.34, 245, 7500)] == ["12.3s", "4m05s", "2h05m"]


def test_progress_without_a_terminal_prints_periodic_lines(capsys):
    progress = console.Progress(10, "decoding t", every_s=0.0)
    assert list(progress.track([[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]], len)) == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    lines = capsys.readouterr().out.splitlines()
    assert all(STAMPED.match(line) for line in lines)
    assert [line[20:].split(",")[0] for line in lines] == [
        "decoding t: 10 examples", "decoding t: 3/10 examples (30%)",
        "decoding t: 6/10 examples (60%)"]
    assert "ETA" in lines[-1]
    quiet = console.Progress(10, "decoding t", every_s=0.0, enabled=False)
    list(quiet.track([[0] * 10], len))
    assert capsys.readouterr().out == ""


def test_eta_counts_the_remaining_steps_and_evaluations():
    # steps 4..12 at 1 s; evaluations at 5, 10 and the final step 12 at 10 s each
    assert console.eta_seconds(3, 12, 1.0, 5, 10.0) == pytest.approx(9 + 30)
    assert console.eta_seconds(10, 10, 1.0, 5, 10.0) == 0.0
    assert console.eta_seconds(3, 12, 1.0, 0, 10.0) == pytest.approx(9)
    assert console.eta_seconds(3, 12, None, 5, 10.0) is None


def test_throughput_leaves_excluded_time_out():
    now = [0.0]
    meter = console.Throughput(clock=lambda: now[0])
    meter.add(2, 1000)
    meter.exclude(6.0)  # a compiling step
    now[0] = 10.0
    assert meter.window() == pytest.approx(1000 / 4)
    assert meter.window() is None  # nothing timed since
    meter.add(1, 500)
    meter.exclude(1.0)
    meter.overhead(1.0)  # a checkpoint write: out of tokens/s, in the time per step
    now[0] = 12.0
    assert meter.window() == pytest.approx(500)
    assert meter.tokens_per_s == pytest.approx(1500 / 5)
    assert meter.step_s == pytest.approx(6 / 3)


def test_step_timer_reports_each_new_shape_as_a_compile():
    step = jax.jit(lambda state, batch: (state + batch.sum(), batch.mean()))
    state = jnp.zeros(())
    with console.StepTimer() as timer:
        for rows in (4, 4, 4, 8, 8, 4):
            state, _ = timer.run(step, state, jnp.ones((rows, 3)), tokens=rows * 3)
        tokens_per_s, compile_s = timer.window()
    assert timer.compiles == 2 and compile_s == pytest.approx(timer.compile_s) and compile_s > 0
    # the steps that did not compile: 4, 4, 8 and 4 rows of 3 tokens
    assert timer.throughput.total_steps == 4 and timer.throughput.total_tokens == 60
    assert tokens_per_s > 0 and float(state) == 4 * 12 + 2 * 24


def test_progress_on_a_terminal_draws_a_bar_on_stderr():
    """A pseudo-terminal that reports no size (as some containers do) still gets the bar."""
    primary, secondary = pty.openpty()
    code = ("from sbs_jax.runtime import console\n"
            "list(console.Progress(4, 'decoding t').track([[0], [1], [2], [3]], len))\n"
            "print('done')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=secondary,
                            stdout=subprocess.PIPE, cwd=REPO_ROOT)
    os.close(secondary)
    drawn = b""
    while select.select([primary], [], [], 120)[0]:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(primary)
    assert proc.stdout.read() == b"done\n" and proc.wait(timeout=60) == 0
    assert b"decoding t:" in drawn and b"/4 [" in drawn  # tqdm redraws at most every 0.1 s

"""The run's time breakdown (bnstudy.perf.timing) and the command line's process settings around it."""

import gc
import subprocess
import sys
import time

import psutil
import pytest

from bnstudy.perf import timing

CHILD = "import time; from bnstudy.perf import timing; print(timing.process_start_time(), time.time())"
CLOCKS = "import time; from bnstudy.perf import timing as t; print(t.process_start_time(), t.python_start_time(), time.time())"


def test_a_process_start_time_lies_between_its_spawn_and_its_first_question():
    # psutil's create_time was up to a second early on Linux (the boot time in whole seconds).
    for _ in range(3):
        before = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
        started, asked = map(float, out.stdout.split())
        assert before - 0.02 <= started <= asked  # the start is known to one clock tick (10 ms)


def test_start_ticks_are_read_past_a_process_name_with_spaces_and_parentheses(tmp_path):
    fields = ["S", *map(str, range(4, 22)), "987654", "0", "0"]  # field 22 is 987654
    stat = tmp_path / "stat"
    stat.write_text(f"1234 (my (odd) name) {' '.join(fields)}\n")
    assert timing.linux_start_ticks(str(stat)) == 987654


def test_the_breakdown_gives_other_as_the_wall_time_no_bucket_claims():
    t = timing.TimeBreakdown(started_at=time.time() - 10.0)
    t.add("train_steps", 4.0)
    t.add("evaluation", 1.5)
    snap = t.snapshot()
    assert set(snap) == {*timing.BUCKETS, "wall"}
    assert snap["wall"] == pytest.approx(10.0, abs=0.5)
    assert snap["other"] == pytest.approx(snap["wall"] - 5.5)
    assert timing.overhead_ratio(snap) == pytest.approx((snap["wall"] - 4.0) / 4.0)
    line = timing.breakdown_line(snap)
    assert line.startswith(f"time {snap['wall']:.1f} s: startup ") and "train_steps 4.0" in line
    with pytest.raises(KeyError, match="unknown time bucket 'other'"):
        t.add("other", 1.0)


def test_startup_is_everything_from_the_process_start_to_its_mark():
    t = timing.TimeBreakdown(started_at=time.time() - 3.0)
    t.mark_startup_done()
    assert t.snapshot()["startup"] == pytest.approx(3.0, abs=0.5)
    # By default the clock starts at this process's creation (psutil's is to within a second).
    assert abs(timing.TimeBreakdown().started_at - psutil.Process().create_time()) < 1.5


def test_a_chained_shells_time_before_python_is_not_startup():
    assert timing.python_start_time(created=100.0, imported=100.3) == 100.0  # Python's own start counts
    assert timing.python_start_time(created=100.0, imported=111.5) == 111.5  # `sleep 10 && python ...`
    chained = subprocess.run(
        ["bash", "-c", f"sleep {timing.NOT_PYTHON_AFTER_S + 1} && exec {sys.executable} -c '{CLOCKS}'"],
        capture_output=True,
        text=True,
        check=True,
    )
    created, python, now = map(float, chained.stdout.split())
    assert python - created > timing.NOT_PYTHON_AFTER_S and now - python < 2.0


def test_the_command_line_freezes_the_collector_after_the_job_and_keeps_its_exit_code(monkeypatch):
    from bnstudy import train
    from bnstudy.app import main as app

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))

    def job():
        calls.append("main")
        sys.exit(2)

    monkeypatch.setattr(app, "main", job)
    with pytest.raises(SystemExit) as e:
        train.cli()
    assert e.value.code == 2
    assert calls == ["freeze", "main", "freeze"]  # the imports frozen, the job, the exit

"""The main loop's timing and input handling (regressions found in review)."""

import itertools
import os
import re
import selectors
import subprocess
import time

import threadward
from conftest import TASK_IMPORTS_WAIT_FOR, run_until


def test_loop_sleeps_when_no_task_has_finished_for_a_long_time(project):
    """Once PROGRESS_INTERVAL passed with no finished task, the loop used to
    compute a timeout of 0 and spin a core until a task finished."""
    runner = threadward.Threadward(project.dir)
    runner._next_sample = time.monotonic() + threadward.STATUS_INTERVAL
    runner._monitor = threadward._Monitor(selectors.DefaultSelector(), {})
    runner._places = threadward._Places([], 0)
    assert runner._next_timeout() > threadward.STATUS_INTERVAL / 2


def test_main_process_cpu_stays_low_while_a_long_task_runs(project, tmp_path):
    """The same, end to end: a task outliving the progress interval would
    show the spin as the main process's CPU time (bounded generously)."""
    project.write(task="""
import time
def task_method(variables, task_folder, log_file):
    time.sleep(4)
""", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1])
""", resources="NUM_WORKERS = 1\n")
    command = project.command()
    script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], "
              "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL); "
              "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
              "print(u.ru_utime + u.ru_stime)")
    # PROGRESS_INTERVAL shrunk through a wrapper module, so 4 s outlives it.
    wrapper = tmp_path / "short_interval.py"
    wrapper.write_text("import sys, runpy\nsys.path.insert(0, %r)\nimport threadward\n"
                       "threadward.PROGRESS_INTERVAL = 0.5\n"
                       "sys.exit(threadward.main())\n" % threadward.__file__.rsplit("/", 1)[0])
    result = subprocess.run([command[0], "-c", script, command[0], str(wrapper)] + command[2:],
                            stdout=subprocess.PIPE, universal_newlines=True, timeout=120)
    cpu_seconds = float(result.stdout.split()[-1])
    # Workers count too (RUSAGE_CHILDREN); a spinning loop would burn ~4 s.
    assert cpu_seconds < 2.5, cpu_seconds
    assert project.successful() == ["1"]


def test_a_line_that_is_not_a_protocol_message_is_ignored(project):
    """Login scripts on an ssh host can print before the worker starts; here a
    command-prefix launcher does it: JSON that is not an object, and text."""
    project.write(resources="""
NUM_WORKERS = 1
LAUNCHER = ["sh", "-c", 'echo null; echo 42; echo "Welcome to node1"; exec "$@"', "sh"]
""")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(project.successful()) == ["1", "2", "3"]
    assert "not a protocol message" in result.stderr


def test_a_last_console_command_without_newline_is_obeyed(project, tmp_path):
    gate = tmp_path / "gate"    # opened once the run has said it quit
    project.write(task=TASK_IMPORTS_WAIT_FOR + """
import os
def task_method(variables, task_folder, log_file):
    wait_for(lambda: os.path.exists(%r), timeout=120, message="the test to open the gate")
""" % str(gate), variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(20)))
""", resources="NUM_WORKERS = 1\n")
    commands, feed = os.pipe()           # "q", no newline, then end of input
    os.write(feed, b"q")
    os.close(feed)
    try:
        run = run_until(project, commands, "then teardown\n", gate)
    finally:
        os.close(commands)
    out, err = run.stdout, run.stderr
    assert run.returncode == 1, out + err
    running = int(re.search(r"^quit: no new tasks; waiting for (\d+) running task\(s\)",
                            out, re.M).group(1))
    assert running <= 1, out
    assert project.successful() == ["0"][:running]     # no task started after the quit
    assert "%d not run" % (20 - running) in out


def asks_of(scheduler, free, holding=False):
    """One pass of the main loop's asking: [(key, task)] in the order asked."""
    return list(scheduler.hand_out(free, holding))


def test_a_worker_given_a_task_in_a_pass_makes_the_others_patient(project):
    """holding was computed once per pass: when the last worker holding a task
    had answered, every worker in the pass asked impatiently, and all of them
    joined busy branches whatever the join limit."""
    scheduler = threadward._Scheduler(2, clock=lambda: 0.0)
    for task in itertools.product(range(2), range(7)):
        scheduler.add(task)
    patience = []
    ask = scheduler.assign
    scheduler.assign = lambda key, ahead=False, patient=True: (
        patience.append((key, patient)) or ask(key, ahead, patient))
    asks_of(scheduler, [0, 1, 2])
    assert patience == [(0, False), (1, True), (2, True)]


def test_of_workers_free_at_once_the_one_whose_branch_has_tasks_asks_first(project):
    """Two results read in one pass: the worker whose model still has tasks
    asked after the one whose model was done, which found that model with no
    worker in it, took it as free (an uncounted join), and the first came
    back to it too."""
    scheduler = threadward._Scheduler(2)
    for task in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        scheduler.add(task)
    assert scheduler.assign("owner") == (0, 0)
    assert scheduler.assign("done") == (1, 0)
    scheduler.release("owner", seconds=1.0)
    scheduler.release("done", seconds=1.0)
    assert scheduler.kept("owner") == 1 and scheduler.kept("done") == 0
    asks = asks_of(scheduler, ["done", "owner"])
    assert asks[0] == ("owner", (0, 1))
    assert asks[1][0] == "done"


def test_of_workers_free_at_once_the_order_is_decided_again_after_each_ask(project):
    """a and c share model 0, b has model 1; all three answer in one pass.
    Sorted once, c came before b; but a takes model 0's last task, so c
    must move, and asking before b it found model 1 with no worker in it
    and took b's next task."""
    scheduler = threadward._Scheduler(2)
    for task in [(0, i) for i in range(5)] + [(1, i) for i in range(3)]:
        scheduler.add(task)
    assert [scheduler.assign(key) for key in "abc"] == [(0, 0), (1, 0), (0, 4)]
    assert [scheduler.assign(key) for key in "abc"] == [(0, 1), (1, 1), (0, 3)]
    for key in "abc":
        scheduler.release(key, seconds=1.0)
    asks = asks_of(scheduler, ["a", "c", "b"])
    assert asks == [("a", (0, 2)), ("b", (1, 2)), ("c", None)]

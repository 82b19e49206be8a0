"""The fault-injection matrix: workers and the main process dying at each
point, hung tasks, preemption, leftover children, torn result files.

After each case the result files must be consistent, no process of the run
may be alive (the `project` fixture checks), and a rerun must complete every
task exactly once.
"""

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import read_until, sigterm_task_zero, wait_for

TASKS = ["0", "1", "2", "3", "4", "5"]

VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(6)))
"""


def task_that(action, when="variables['x'] == 3", once=True):
    """A task source that runs `action` for one value of x (once per project
    if `once`, via a marker file, so a rerun of the same task succeeds)."""
    guard = "not os.path.exists(marker)" if once else "True"
    return """
import os, signal, subprocess, sys, time
def task_method(variables, task_folder, log_file):
    marker = os.path.join(os.path.dirname(os.path.dirname(task_folder)), "fault.done")
    print("task", variables["x"], "in", os.getpid())
    if %s and %s:
        open(marker, "w").close()
%s
""" % (when, guard, "\n".join("        " + line for line in action.strip().splitlines()))


def assert_consistent_and_rerun_completes(project, tasks=TASKS):
    """No duplicates in successful_tasks.txt; a rerun finishes every task once."""
    before = project.successful()
    assert len(before) == len(set(before))
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    after = project.successful()
    assert sorted(after) == sorted(tasks)
    assert after[:len(before)] == before


def test_worker_exiting_mid_task_is_recorded_and_replaced(project):
    project.write(task=task_that("sys.stdout.flush(); os._exit(7)"), variables=VARIABLES,
                  resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 1
    assert project.failed() == {"3": "worker %s exited with code 7" %
                                project.failed()["3"].split()[1]}
    assert "worker 0 exited with code 7; started worker 1 in its place" in result.stdout
    assert "task 3 in" in result.stdout  # the last lines of its log are shown
    assert sorted(project.successful()) == ["0", "1", "2", "4", "5"]
    assert_consistent_and_rerun_completes(project)


def test_worker_killed_by_signal_mid_task(project):
    project.write(task=task_that("os.kill(os.getpid(), signal.SIGKILL)"), variables=VARIABLES)
    result = project.run()
    assert result.returncode == 1
    assert "killed by SIGKILL" in project.failed()["3"]
    assert_consistent_and_rerun_completes(project)


def test_worker_segfault_mid_task(project):
    project.write(task=task_that("import ctypes; ctypes.string_at(0)"), variables=VARIABLES)
    result = project.run()
    assert result.returncode == 1
    assert "SIGSEGV" in project.failed()["3"]
    assert_consistent_and_rerun_completes(project)


def test_worker_killed_after_a_task_loses_nothing(project, tmp_path):
    pid_file = tmp_path / "pid"
    project.write(task="""
import os
def task_method(variables, task_folder, log_file):
    with open(%r + ".tmp", "w") as stream:   # atomic: the next task may be running
        stream.write(str(os.getpid()))
    os.replace(%r + ".tmp", %r)
""" % ((str(pid_file),) * 3), variables=VARIABLES + """
import os, signal
killed = []
def on_task_success(variables, task_folder, log_file):
    if variables["x"] == 1 and not killed:
        pid = int(open(%r).read())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
""" % str(pid_file), resources="NUM_WORKERS = 1\n")
    result = project.run()
    # The kill races with handing the worker its next task: that task may be
    # recorded as failed (the worker died holding it), never as succeeded.
    assert "killed by SIGKILL; started worker 1 in its place" in result.stdout
    assert set(project.failed().values()) <= {"worker 0 was killed by SIGKILL"}
    assert len(project.successful()) + len(project.failed()) == 6
    assert_consistent_and_rerun_completes(project)


def test_worker_failing_to_start_is_retried_then_given_up(project):
    project.write(task="""
def before_each_worker(worker_id):
    raise RuntimeError("no GPU memory left for worker %d" % worker_id)
def task_method(variables, task_folder, log_file):
    pass
""", variables=VARIABLES, resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 1
    assert result.stdout.count("could not start") == 3
    assert "RuntimeError: no GPU memory left for worker 2" in result.stdout
    assert "giving up worker slot 0 after 3 failed starts" in result.stdout
    assert re.search(r"^stopped \(no worker could start\) in \S+: 0 succeeded, 0 failed, "
                     r"6 not run$", result.stdout, re.M), result.stdout
    assert project.successful() == []
    assert project.failed() == {}          # never started: not failed, run again later


def test_one_bad_worker_start_is_replaced(project):
    project.write(task="""
def before_each_worker(worker_id):
    if worker_id == 0:
        raise RuntimeError("flaky start")
def task_method(variables, task_folder, log_file):
    pass
""", variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker 0 could not start" in result.stdout
    assert sorted(project.successful()) == TASKS


def test_hung_task_times_out_and_worker_is_replaced(project):
    project.write(task=task_that("time.sleep(3600)") + "\nTASK_TIMEOUT = 1\n",
                  variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    result = project.run()
    assert result.returncode == 1
    assert project.failed() == {"3": "timeout"}
    assert sorted(project.successful()) == ["0", "1", "2", "4", "5"]
    assert_consistent_and_rerun_completes(project)


def test_main_killed_mid_run_leaves_no_worker_and_rerun_completes(project):
    # The task kills its worker's parent (the main process) and then finishes.
    project.write(task=task_that("os.kill(os.getppid(), signal.SIGKILL)"), variables=VARIABLES,
                  resources="NUM_WORKERS = 2\n")
    result = project.run()
    assert result.returncode == -signal.SIGKILL
    assert "3" not in project.successful()   # its result could not be recorded
    assert_consistent_and_rerun_completes(project)


def test_main_killed_during_teardown_then_rerun(project):
    project.write(task="""
import os, signal
def task_method(variables, task_folder, log_file):
    pass
def after_all_tasks():
    # the main process runs in the project directory, as workers do
    if not os.path.exists("teardown.done"):
        open("teardown.done", "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
""", variables=VARIABLES)
    result = project.run()
    assert result.returncode == -signal.SIGKILL
    assert sorted(project.successful()) == TASKS
    rerun = project.run()
    assert rerun.returncode == 0
    assert "all 6 tasks already succeeded" in rerun.stdout


def test_main_killed_during_generation_keeps_old_task_list(project):
    assert project.run().returncode == 0
    with open(os.path.join(project.queue, "all_tasks.json"), "rb") as stream:
        old = stream.read()
    project.write(variables="""
import os, signal
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(8)))
    os.kill(os.getpid(), signal.SIGKILL)
""")
    assert project.run().returncode == -signal.SIGKILL
    with open(os.path.join(project.queue, "all_tasks.json"), "rb") as stream:
        assert stream.read() == old


def test_sigterm_gives_running_tasks_a_grace_period_then_interrupts(project, tmp_path):
    started = tmp_path / "started"
    project.write(task="""
import time
SIGTERM_GRACE = 1
def task_method(variables, task_folder, log_file):
    open(%r, "w").close()
    time.sleep(3600)
def after_all_tasks():
    print("after_all_tasks ran")
""" % str(started), variables=VARIABLES, resources="NUM_WORKERS = 1\n")
    process = project.start()
    wait_for(started.exists)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "running tasks get 1s to finish" in out
    assert "after_all_tasks ran" in out
    assert project.failed() == {"0": "interrupted"}
    assert project.successful() == []
    assert_consistent_and_rerun_completes_after_fix(project)


def assert_consistent_and_rerun_completes_after_fix(project):
    project.write(task="def task_method(variables, task_folder, log_file):\n    pass\n")
    assert_consistent_and_rerun_completes(project)


def test_task_leaving_background_children_has_them_ended(project, tmp_path):
    pids = tmp_path / "pids"
    project.write(task="""
import os, subprocess
def task_method(variables, task_folder, log_file):
    child = subprocess.Popen(["sleep", "1000"])
    # a double fork: the grandchild is orphaned when its parent exits
    subprocess.run(["sh", "-c", "sleep 1000 & echo $! >> %s"])
    with open(%r, "a") as stream:
        stream.write("%%d\\n" %% child.pid)
""" % (str(pids), str(pids)), variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 12

    def all_gone():
        return not [p for p in recorded if psutil.pid_exists(p) and
                    psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    wait_for(all_gone, message="the children the tasks left to be ended")


def shm_names(prefix):
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm to look in")
def test_the_resource_tracker_ends_itself_and_unlinks_what_tasks_left(project):
    # multiprocessing's resource tracker ignores SIGTERM; it exits when the
    # worker closes its pipe, unlinking the shared memory left registered.
    # Ended like a stray it was SIGKILLed after KILL_WAIT (each worker's exit
    # took 5 s more) and the segments stayed in /dev/shm.
    prefix = "tw_test_%d_" % os.getpid()
    project.write(task="""
from multiprocessing import shared_memory
def task_method(variables, task_folder, log_file):
    shared_memory.SharedMemory(create=True, size=4096, name=%r + str(variables["x"]))
""" % prefix, variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    try:
        result = project.run()
        assert result.returncode == 0, result.stdout + result.stderr
        assert shm_names(prefix) == []
    finally:
        for name in shm_names(prefix):
            os.unlink(os.path.join("/dev/shm", name))


def test_a_tracker_started_by_a_converter_outlives_its_value(project):
    # The tracker serves every later user in the worker: dropping the value
    # whose converter happened to start it must not end it.
    pids = os.path.join(project.dir, "trackers")
    project.write(task="""
import os
from multiprocessing import resource_tracker
def task_method(variables, task_folder, log_file):
    with open(%r, "a") as stream:
        stream.write("%%d\\n" %% resource_tracker._resource_tracker._pid)
""" % pids, resources="NUM_WORKERS = 1\n", variables="""
from multiprocessing import resource_tracker
def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["a", "b", "c"])
    variable_set.add_variable(name="x", values=[0, 1])
def model_to_value(string_value, nickname):
    resource_tracker.ensure_running()   # as a library's first shared memory would
    return string_value
""")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    with open(pids) as stream:
        seen = stream.read().split()
    assert len(seen) == 6 and len(set(seen)) == 1, seen   # one tracker, never relaunched


def test_task_closing_its_stdin_and_stdout_does_not_break_the_worker(project):
    project.write(task="""
import os
def task_method(variables, task_folder, log_file):
    os.close(0)
    os.close(1)
""", variables=VARIABLES, resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(project.successful()) == TASKS


def test_torn_last_line_of_successful_tasks_is_tolerated(project):
    project.write(variables=VARIABLES)
    assert project.run().returncode == 0
    path = os.path.join(project.queue, "successful_tasks.txt")
    with open(path, "w") as stream:
        stream.write("0\n1\n2\n4")              # the crash tore "4\n" to "4"
    result = project.run()
    assert result.returncode == 0
    assert "3 of 6 tasks already succeeded" in result.stdout
    assert sorted(project.successful()) == TASKS
    assert project.successful().count("4") == 1


def test_unwritable_task_folder_fails_that_task_only(project):
    os.makedirs(project.outputs)
    with open(os.path.join(project.outputs, "2"), "w") as stream:
        stream.write("a file where the task folder should be")
    project.write(variables=VARIABLES)
    result = project.run()
    assert result.returncode == 1
    assert "cannot create the task folder" in project.failed()["2"]
    assert sorted(project.successful()) == ["0", "1", "3", "4", "5"]


def test_no_processes_left_after_second_ctrl_c(project, tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    project.write(task="""
import os, time
def task_method(variables, task_folder, log_file):
    open(os.path.join(%r, str(variables["x"])), "w").close()
    time.sleep(3600)
""" % str(started), variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    process = subprocess.Popen(project.command(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, start_new_session=True,
                               env=project.env())
    wait_for(lambda: len(os.listdir(str(started))) == 2)
    os.killpg(process.pid, signal.SIGINT)   # workers are in their own groups: only main
    # Two pending SIGINTs merge into one: send the second after the first is seen.
    seen = read_until(process.stdout, "press Ctrl-C again")
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    out = seen + out
    assert process.returncode == 1, out + err
    assert set(project.failed().values()) == {"interrupted"}
    assert len(project.failed()) == 2
    assert project.successful() == []


if sys.platform != "linux":   # pragma: no cover
    import pytest
    pytestmark = pytest.mark.skip("the fault matrix relies on Linux process semantics")


def test_main_killed_mid_task_ends_the_task_promptly(project, tmp_path):
    """The stdin watchdog: a busy worker whose main process is gone does not
    run its (hour-long) task to the end; the task's children go with it."""
    started = tmp_path / "started"
    started.mkdir()
    project.write(task="""
import os, subprocess, time
def task_method(variables, task_folder, log_file):
    child = subprocess.Popen(["sleep", "3600"])
    with open(os.path.join(%r, str(variables["x"])), "w") as stream:
        stream.write("%%d %%d" %% (os.getpid(), child.pid))
    time.sleep(3600)
""" % str(started), variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    process = project.start()
    wait_for(lambda: len(os.listdir(str(started))) == 2)
    pids = [int(pid) for name in os.listdir(str(started))
            for pid in (started / name).read_text().split()]
    process.kill()
    process.communicate(timeout=30)

    def all_gone():
        return not [p for p in pids if psutil.pid_exists(p) and
                    psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    wait_for(all_gone, message="the tasks and their children to end after the main process")
    assert project.successful() == [] and project.failed() == {}


def test_worker_sigterm_from_outside_interrupts_its_task_and_is_not_replaced(project,
                                                                             tmp_path):
    """As when Slurm preempts a job and signals every step: the task is
    recorded `interrupted` (not a failure of the task), its worker is not
    replaced, and the other worker finishes the sweep."""
    returncode, out, err = sigterm_task_zero(project, tmp_path, VARIABLES)
    assert returncode == 1, out + err
    assert project.failed() == {"0": "interrupted"}
    assert sorted(project.successful()) == TASKS[1:]
    assert "stopped by a SIGTERM from outside threadward; it is not replaced" in out
    assert "in its place" not in out


def test_many_quick_tasks_never_trip_the_stdin_watchdog(project):
    """A regression test: the watchdog once acted on a stale readiness event
    (the next task's line, already read) and killed healthy workers."""
    project.write(task="def task_method(variables, task_folder, log_file):\n    pass\n",
                  variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(3000)))
""", resources="NUM_WORKERS = 2\n")
    result = project.run()
    assert result.returncode == 0, result.stdout[-2000:]
    assert project.failed() == {}
    assert len(project.successful()) == 3000


TEAR_RESULT = r'''
import os, signal, subprocess, sys
# Relays the worker's stdout; the result line of task "3" is cut in half,
# then the worker and this relay die: what the main process sees when a
# worker is killed while writing its result.
worker = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)
for line in worker.stdout:
    if b'"op": "result"' in line and b'"id": "3"' in line \
            and not os.path.exists("tear.done"):   # once: the rerun must complete
        open("tear.done", "w").close()
        os.write(1, line[:len(line) // 2])
        worker.kill()
        os._exit(9)
    os.write(1, line)
sys.exit(worker.wait())
'''


def test_worker_killed_while_writing_its_result_line(project, tmp_path):
    relay = tmp_path / "tear_result.py"
    relay.write_text(TEAR_RESULT)
    project.write(task="def task_method(variables, task_folder, log_file):\n    pass\n",
                  variables=VARIABLES, resources="NUM_WORKERS = 1\nLAUNCHER = [%r, %r]\n"
                  % (sys.executable, str(relay)))
    result = project.run()
    assert result.returncode == 1, result.stdout + result.stderr
    assert project.failed() == {"3": "worker 0 exited with code 9"}
    assert "not a protocol message" not in result.stderr   # the torn half is dropped
    assert sorted(project.successful()) == ["0", "1", "2", "4", "5"]
    assert_consistent_and_rerun_completes(project)


def test_a_result_file_that_cannot_grow_stops_the_run_and_loses_nothing(project):
    """As on a full disk: the result line cannot be written (here RLIMIT_FSIZE
    makes the write fail with EFBIG); the run says why and stops, the file
    keeps whole lines only, and a rerun with room runs the tasks again."""
    limit = 1 << 16
    junk = b"".join(b"old-%06d\n" % i for i in range(limit // 11 + 1))[:limit - 1] + b"\n"
    with open(os.path.join(project.queue, "successful_tasks.txt"), "wb") as stream:
        stream.write(junk)   # IDs of no current task; the file is at the limit

    def no_room():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write() fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    project.write(task="def task_method(variables, task_folder, log_file):\n    pass\n",
                  variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    result = subprocess.run(project.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120,
                            env=project.env(), preexec_fn=no_room)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot record" in result.stdout and "File too large" in result.stdout
    assert "stopped (results cannot be written)" in result.stdout
    with open(os.path.join(project.queue, "successful_tasks.txt"), "rb") as stream:
        assert stream.read() == junk
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(project.successful()) == sorted(
        junk.decode().split() + TASKS)


def test_sigterm_to_a_worker_between_short_tasks_gives_back_what_is_queued(project):
    """A SIGTERM from outside that lands between two short tasks (or while
    the next one is queued): the worker stops, the task it had not started
    is run later, never recorded as failed by the worker's exit."""
    project.write(task="""
import os, time
def task_method(variables, task_folder, log_file):
    time.sleep(0.002)
    with open(os.path.join(os.path.dirname(os.path.dirname(task_folder)), "pid"), "w") as f:
        f.write(str(os.getpid()))
""", variables="""
import os, signal
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(60)))
def on_task_success(variables, task_folder, log_file):
    if variables["x"] == 20:
        path = os.path.join(os.path.dirname(os.path.dirname(task_folder)), "pid")
        os.kill(int(open(path).read()), signal.SIGTERM)
""", resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 1, result.stdout + result.stderr
    assert set(project.failed().values()) <= {"interrupted"}, project.failed()
    assert "stopped by a SIGTERM from outside threadward" in result.stdout
    assert_consistent_and_rerun_completes(project, [str(x) for x in range(60)])

"""An adversarial pass: what broke once, and what it does now (issue 13).

Each test failed on the code before the fix it names."""

import os
import resource
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import TASK_IMPORTS_WAIT_FOR, read_until, relayed, wait_for

import threadward

RANGE = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(1, %d)))
"""


# A task that marks itself started, then waits for the test to create ``gate``.
MARKED = TASK_IMPORTS_WAIT_FOR + """
import os
%s

def task_method(variables, task_folder, log_file):
    open(%r, "a").close()
    wait_for(lambda: os.path.exists(%r), timeout=120, message="the test to open the gate")
"""


def signalled(project, started, signum, settings=""):
    """Run 4 tasks on one worker; send ``signum`` once the first has started,
    and let the tasks end once the run has said it saw the signal."""
    gate = started.parent / "gate"
    project.write(task=MARKED % (settings, str(started), str(gate)), variables=RANGE % 5,
                  resources="NUM_WORKERS = 1\n")
    run = project.start()
    wait_for(started.exists)
    run.send_signal(signum)
    seen = read_until(run.stdout, "%s: no new tasks" % signal.Signals(signum).name)
    gate.touch()
    out, err = run.communicate(timeout=60)
    return run.returncode, seen + out, err


def with_file_limit(project, limit):
    """`threadward run` under `ulimit -f` (bytes): a larger file is EFBIG."""
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(project.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120,
                          env=project.env(), preexec_fn=small_files)


def test_stop_execution_starts_nothing_after_the_first_failure(project):
    # Short tasks are queued ahead: x = 4 was sent before x = 3's failure came.
    project.write(task="""
def task_method(variables, task_folder, log_file):
    if variables["x"] == 3:
        raise ValueError("three")
""", variables=RANGE % 9 + 'FAILURE_HANDLING = "STOP_EXECUTION"\n',
                  resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 1
    assert project.successful() == ["1", "2"]
    assert list(project.failed()) == ["3"]
    for x in range(4, 9):   # never started: no folder, no log
        assert not os.path.exists(os.path.join(project.outputs, str(x))), x
    assert "5 not run" in result.stdout


def test_num_workers_beyond_the_tasks_starts_one_worker_per_task(project):
    project.write(variables=RANGE % 4, resources="NUM_WORKERS = 50\n")
    result = project.run()
    assert result.returncode == 0, result.stderr
    assert "NUM_WORKERS = 50, but only 3 tasks to run: starting 3 workers" in result.stdout
    logs = os.listdir(os.path.join(project.config, "worker_logs"))
    assert sorted(logs) == ["worker_0.log", "worker_1.log", "worker_2.log"]


def test_more_workers_than_cores_without_gpus_is_warned_about(project):
    cores = len(os.sched_getaffinity(0))
    project.write(variables=RANGE % (cores + 3), resources="NUM_WORKERS = %d\n" % (cores + 1))
    result = project.run()
    assert result.returncode == 0, result.stderr
    assert ("note: %d workers on %d cores and no GPUs: they will share the cores"
            % (cores + 1, cores)) in result.stdout


@pytest.mark.parametrize("name", ["TASK_TIMEOUT", "SIGTERM_GRACE"])
def test_nan_is_a_configuration_error(project, name):
    project.write(task="import math\n%s = float('nan')\n\ndef task_method(v, f, l):\n    pass\n"
                  % name)
    result = project.run()
    assert result.returncode == 2
    assert "task_specification.py:2: %s = nan; it must be a number" % name in result.stderr
    assert not os.path.exists(os.path.join(project.queue, "all_tasks.json"))


def test_infinite_sigterm_grace_lets_running_tasks_finish(project, tmp_path):
    code, out, err = signalled(project, tmp_path / "started", signal.SIGTERM,
                               settings='SIGTERM_GRACE = TASK_TIMEOUT = float("inf")')
    assert code == 1, out + err
    assert "running tasks may take as long as they need" in out
    assert project.successful() == ["1"] and project.failed() == {}
    assert "Traceback" not in err


def test_an_unwritable_task_list_is_one_line_and_nothing_half_written(project):
    project.write(variables=RANGE % 2000)
    result = with_file_limit(project, 4096)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("threadward: error: cannot write "
                               "threadward/task_queue/all_tasks.json: File too large")
    assert not [name for name in os.listdir(project.queue) if name.startswith("all_tasks.json")]
    assert project.successful() == [] and not os.path.exists(project.outputs)


def test_a_symlink_planted_at_a_task_log_is_not_written_through(project, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = os.path.join(project.outputs, "2")
    os.makedirs(folder)
    os.symlink(str(victim), os.path.join(folder, "task.log"))
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(os.path.join(folder, "task.log"))
    assert "running {'x': 2}" in project.log("2")


def test_a_task_folder_that_is_a_symlink_still_works(project, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.makedirs(project.outputs, exist_ok=True)
    os.symlink(str(scratch), os.path.join(project.outputs, "1"))
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running {'x': 1}" in (scratch / "task.log").read_text()


def test_stale_temporary_files_are_removed_and_live_ones_kept(project):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(project.queue, "all_tasks.json.tmp%d" % dead.pid)
    live = os.path.join(project.queue, "all_tasks.json.tmp%d" % os.getpid())
    for path in (stale, live):
        with open(path, "w") as stream:
            stream.write("x" * 1000)
    result = project.run()
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(stale)
    assert os.path.exists(live)
    os.unlink(live)


def test_sighup_is_handled_like_sigterm(project, tmp_path):
    code, out, err = signalled(project, tmp_path / "started", signal.SIGHUP)
    assert code == 1, out + err
    assert "SIGHUP: no new tasks" in out
    assert project.successful() == ["1"] and project.failed() == {}
    assert "stopped (by SIGHUP)" in out


def test_sighup_after_the_terminal_is_gone_still_finishes_and_records(project, tmp_path):
    """The terminal closed: writing to it fails; the run goes on quietly."""
    started, gate = tmp_path / "started", tmp_path / "gate"
    # The worker behind a relay that logs the protocol: the CANCEL the run
    # sends its worker on SIGHUP shows that it acted on it (it cannot say so).
    resources, protocol = relayed(tmp_path)
    project.write(task=MARKED % ("", str(started), str(gate)), variables=RANGE % 5,
                  resources=resources)
    read_end, write_end = os.pipe()
    run = subprocess.Popen(project.command(), stdin=subprocess.DEVNULL, stdout=write_end,
                           stderr=write_end, env=project.env())
    os.close(write_end)
    wait_for(started.exists)
    os.close(read_end)   # the terminal is gone: writes now fail (EPIPE)
    run.send_signal(signal.SIGHUP)
    wait_for(lambda: b"> CANCEL\n" in protocol.read_bytes(),
             message="the run to take back what its worker has not started")
    gate.touch()
    assert run.wait(timeout=60) == 1
    assert project.successful() == ["1"] and project.failed() == {}
    summary = os.path.join(project.queue, "status.json")
    wait_for(lambda: '"finished"' in open(summary).read())


def test_run_help_says_the_default_directory_console_commands_and_exit_codes(project):
    result = subprocess.run([sys.executable, project.command()[1], "run", "--help"],
                            stdout=subprocess.PIPE, universal_newlines=True)
    assert result.returncode == 0
    text = result.stdout
    assert "default: the current directory" in " ".join(text.split())
    for command in ("show (s)", "quit (q)", "add (a)", "remove N (r N)"):
        assert command in text
    assert "exit codes: 0" in text


def test_status_after_the_run_prints_no_empty_worker_table(project):
    result = project.run()
    assert result.returncode == 0
    status = project.run(subcommand="status")
    assert "finished" in status.stdout
    assert "PID" not in status.stdout, status.stdout


SLOW = TASK_IMPORTS_WAIT_FOR + """
import os

def task_method(variables, task_folder, log_file):
    open(os.path.join(os.path.dirname(task_folder), "started"), "a").close()
    # bounded, so that a failed test does not leave a run behind
    wait_for(lambda: os.path.exists(os.path.join(os.path.dirname(task_folder), "go")),
             timeout=120, message="the test to create task_outputs/go")
"""


def test_a_second_run_on_a_running_project_refuses_before_touching_anything(project):
    project.write(task=SLOW, resources="NUM_WORKERS = 1\n")
    first = project.start()
    wait_for(lambda: os.path.exists(os.path.join(project.outputs, "started")))
    files = {}
    for folder, _, names in os.walk(project.config):
        for name in names:
            path = os.path.join(folder, name)
            files[path] = os.stat(path).st_mtime_ns, os.path.getsize(path)
    second = project.run()
    assert second.returncode == 2
    message = second.stderr.strip()
    assert message.startswith("threadward: error: another `threadward run` is using this "
                              "project: PID %d on %s since " % (first.pid, os.uname().nodename))
    assert "stop it" in message
    after = {}
    for folder, _, names in os.walk(project.config):
        for name in names:
            path = os.path.join(folder, name)
            after[path] = os.stat(path).st_mtime_ns, os.path.getsize(path)
    assert after == files   # nothing written, truncated or created
    open(os.path.join(project.outputs, "go"), "w").close()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, out + err
    assert sorted(project.successful()) == ["1", "2", "3"]


def test_the_lock_of_a_killed_run_is_taken_over_and_said_so(project):
    project.write(task=SLOW, resources="NUM_WORKERS = 1\n")
    first = project.start()
    wait_for(lambda: os.path.exists(os.path.join(project.outputs, "started")))
    first.kill()
    first.communicate(timeout=30)
    open(os.path.join(project.outputs, "go"), "w").close()
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("taking over from a run that ended without letting go of the project (PID %d on %s"
            % (first.pid, os.uname().nodename)) in result.stdout
    with open(os.path.join(project.queue, "run.lock")) as stream:
        assert stream.read() == ""   # let go at the end


def test_dry_run_does_not_take_the_lock(project):
    project.write(task=SLOW, resources="NUM_WORKERS = 1\n")
    first = project.start()
    wait_for(lambda: os.path.exists(os.path.join(project.outputs, "started")))
    assert project.run("--dry-run").returncode == 0
    wait_for(lambda: os.path.exists(os.path.join(project.queue, "status.json")))
    status = project.run(subcommand="status")
    assert status.returncode == 0 and "running (main process %d)" % first.pid in status.stdout
    open(os.path.join(project.outputs, "go"), "w").close()
    first.communicate(timeout=60)
    assert first.returncode == 0


@pytest.mark.parametrize("filename, line, message", [
    ("resource_constraints.py", "NUM_WORKER = 4",
     "resource_constraints.py:2: NUM_WORKER is not a setting; did you mean NUM_WORKERS?"),
    ("resource_constraints.py", "TASK_TIMEOUT = 120",
     "resource_constraints.py:2: TASK_TIMEOUT is a setting of task_specification.py, not of "
     "resource_constraints.py: move it there"),
    ("task_specification.py", "TASK_TIMOUT = 120",
     "task_specification.py:2: TASK_TIMOUT is not a setting; did you mean TASK_TIMEOUT?"),
    ("variable_iteration.py", "NUM_GPU_PER_WORKER = 1",
     "variable_iteration.py:2: NUM_GPU_PER_WORKER is not a setting; did you mean "
     "NUM_GPUS_PER_WORKER? (it belongs in resource_constraints.py)"),
])
def test_a_setting_in_the_wrong_file_or_misspelled_is_an_error(project, filename, line, message):
    path = os.path.join(project.config, filename)
    with open(path) as stream:
        text = stream.read()
    with open(path, "w") as stream:
        stream.write("\n" + line + "\n" + text)
    result = project.run()
    assert result.returncode == 2
    assert message in result.stderr
    assert not os.path.exists(os.path.join(project.queue, "all_tasks.json"))


def test_the_users_own_constants_are_fine(project):
    project.write(task="""
DATA_DIR = "/data"
BATCH_SIZE = 32
NUM_WORKERS_DATALOADER = 4
MAX_WORKERS = 3
N_WORKERS = 2
OUTPUT_MODE = "LOG_FILE_ONLY"
OUTPUT_MODEL = "gpt2"   # one letter more than a setting the file sets: the user's own

def task_method(variables, task_folder, log_file):
    pass
""")
    result = project.run()
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stdout


def test_a_name_a_word_off_a_setting_or_a_converter_of_no_variable_is_noted(project):
    # They may be the user's own names: a note each, and the sweep runs.
    project.write(task="""
RETRY = 2
TIMEOUT = 600

def task_method(variables, task_folder, log_file):
    pass
""", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["a"])

def modle_to_value(string_value, nickname):
    raise AssertionError("never called")
""")
    result = project.run("--dry-run")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: threadward/task_specification.py:2: RETRY is not a setting and does nothing; "
        "did you mean RETRIES? (if RETRY is your own constant, ignore this)",
        "note: threadward/task_specification.py:3: TIMEOUT is not a setting and does nothing; "
        "did you mean TASK_TIMEOUT? (if TIMEOUT is your own constant, ignore this)",
        "note: threadward/variable_iteration.py:5: modle_to_value converts nothing: no "
        "variable is called 'modle' (the variables: model)"]
    assert project.run().returncode == 0   # and it runs


def test_a_log_that_cannot_grow_fails_that_task_and_the_worker_goes_on(project):
    """A full disk, a quota or `ulimit -f` under a task's log (here the limit:
    EFBIG; ENOSPC and EIO take the same path)."""
    project.write(task="""
import os, sys

def task_method(variables, task_folder, log_file):
    print("worker", os.getpid())
    if variables["x"] == 2:
        for _ in range(200):
            print("x" * 100)              # 20 KB: past the limit
        sys.stdout.flush()
        os.write(1, b"y" * 20000)     # and at the fd level
""", variables=RANGE % 5, resources="NUM_WORKERS = 1\n")
    result = with_file_limit(project, 8192)
    assert result.returncode == 1, result.stdout + result.stderr
    assert sorted(project.successful()) == ["1", "3", "4"]
    assert project.failed() == {"2": "task.log: File too large"}
    workers = {project.log(x).split()[1] for x in ("1", "3", "4")}
    assert len(workers) == 1           # the same worker, its loaded values kept
    assert "exited with code" not in result.stdout


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KB tmpfs (root only: skipped elsewhere)."""
    where = tmp_path / "tiny"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (%s)" % mounted.stdout.strip())
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)])


def test_a_full_disk_under_a_task_fails_that_task_with_the_reason(project, tiny_filesystem):
    os.makedirs(project.outputs)
    os.symlink(str(tiny_filesystem), os.path.join(project.outputs, "2"))
    project.write(task="""
import os

def task_method(variables, task_folder, log_file):
    print("worker", os.getpid())
    if variables["x"] == 2:
        for _ in range(2000):
            print("x" * 100)
""", variables=RANGE % 5, resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 1, result.stdout + result.stderr
    assert project.failed() == {"2": "task.log: No space left on device"}
    assert sorted(project.successful()) == ["1", "3", "4"]
    assert len({project.log(x).split()[1] for x in ("1", "3", "4")}) == 1
    assert "xxxx" not in project.log("3")   # nothing of task 2's output leaks on


def test_a_task_ending_its_childs_process_group_does_not_end_itself(project):
    project.write(task="""
import os, signal, subprocess, time

def task_method(variables, task_folder, log_file):
    child = subprocess.Popen(["sleep", "60"])
    time.sleep(0.1)
    os.killpg(os.getpgid(child.pid), signal.SIGTERM)   # the idiom: it reaches us too
    assert child.wait(timeout=10) == -signal.SIGTERM
    time.sleep(0.2)
    print("carried on")
""", variables=RANGE % 4, resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(project.successful()) == ["1", "2", "3"]
    assert "SIGTERM from outside" not in result.stdout
    assert "carried on" in project.log("3")


def test_one_eta_counts_down_between_results(tmp_path, monkeypatch):
    """The progress line, `show` and status.json read one estimate, made at
    the last result: two seconds later it is two seconds less (before, each
    view divided the growing elapsed time by the same count and went up)."""
    import threadward
    clock = [990.0]
    monkeypatch.setattr(threadward.time, "monotonic", lambda: clock[0])
    ledger = threadward._Ledger(str(tmp_path))
    ledger.total = 10
    ledger.open(fresh=True)
    clock[0] = 1000.0
    for task_id in "abcde":          # 10 s for 5 tasks: 10 s left
        ledger.record(task_id, True, "", 2.0)
    assert ledger.eta() == 10.0
    clock[0] += 2
    assert ledger.eta() == 8.0
    assert "ETA 0:00:08" in ledger.progress()      # 5 of 10: a tenth passed
    assert "ETA 0:00:08" in ledger.overview()[0]   # `show` reads the same one
    ledger.close()


def test_the_template_comment_names_a_folder_the_demo_makes(tmp_path):
    threadward_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "threadward.py")
    subprocess.run([sys.executable, threadward_py, "init", str(tmp_path)], check=True,
                   stdout=subprocess.DEVNULL)
    with open(tmp_path / "threadward" / "variable_iteration.py") as stream:
        comment = [line for line in stream if "VARIABLE_SUBFOLDER" in line and "#" in line][0]
    example = comment.split()[3]
    subprocess.run([sys.executable, threadward_py, "run", str(tmp_path)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    assert os.path.isdir(tmp_path / "threadward" / "task_outputs" / example), example


def test_sighup_under_nohup_is_still_ignored(project, tmp_path):
    started, gate = tmp_path / "started", tmp_path / "gate"
    project.write(task=MARKED % ("", str(started), str(gate)), variables=RANGE % 4,
                  resources="NUM_WORKERS = 1\n")
    run = subprocess.Popen(project.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, env=project.env(),
                           preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for(started.exists)
    run.send_signal(signal.SIGHUP)
    # The run acts on signals in the order they came: once it has shown the
    # table SIGUSR1 asks for, a SIGHUP it would act on has been acted on.
    run.send_signal(signal.SIGUSR1)
    seen = read_until(run.stdout, "elapsed")
    gate.touch()
    out, err = run.communicate(timeout=60)
    out = seen + out
    assert run.returncode == 0, out + err
    assert "SIGHUP" not in out
    assert sorted(project.successful()) == ["1", "2", "3"]


def test_a_thread_ending_its_childs_process_group_does_not_end_the_worker(project):
    project.write(task="""
import os, signal, subprocess, threading, time

def task_method(variables, task_folder, log_file):
    child = subprocess.Popen(["sleep", "60"])
    stopper = threading.Timer(0.1, os.killpg, args=(os.getpgid(child.pid), signal.SIGTERM))
    stopper.start()
    assert child.wait(timeout=10) == -signal.SIGTERM
    stopper.join()
    time.sleep(0.2)
    print("carried on")
""", variables=RANGE % 3, resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(project.successful()) == ["1", "2"]
    assert "carried on" in project.log("2")


def test_a_process_a_result_hook_starts_in_its_own_session_survives_the_run(project, tmp_path):
    pid_file = tmp_path / "hook.pid"
    project.write(variables=RANGE % 3 + """
import subprocess

def on_task_success(variables, task_folder, log_file):
    if variables["x"] == 1:
        # not on the run's stdout/stderr: project.run() would wait for it to close them
        p = subprocess.Popen(["sleep", "600"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        open(%r, "w").write(str(p.pid))
""" % str(pid_file))
    result = project.run()
    pid = int(pid_file.read_text())
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        # still there after every worker and the main process have exited
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_ctrl_c_inside_a_result_hook_is_the_first_ctrl_c(project):
    """A hook (or a library it calls) put Python's default SIGINT handler
    back: the Ctrl-C is a KeyboardInterrupt inside the hook.  It is the first
    Ctrl-C, not an exception that unwinds through the results read with it
    (the run used to hang with a task that had finished counted running)."""
    project.write(resources="NUM_WORKERS = 2\n", variables=RANGE % 40 + """
import os, signal, time

calls = []

def on_task_success(variables, task_folder, log_file):
    calls.append(variables["x"])
    if len(calls) == 6:
        time.sleep(1.5)   # results pile up: the next ones come several in one read
    elif len(calls) == 7:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGINT)
""")
    result = project.run(timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stopping: no new tasks" in result.stdout
    assert "stopped (by SIGINT)" in result.stdout
    started = len(os.listdir(project.outputs))
    assert len(project.successful()) + len(project.failed()) == started < 40
    assert project.failed() == {}


def test_a_result_file_that_cannot_be_written_does_not_take_the_others_lines(tmp_path):
    ledger = threadward._Ledger(str(tmp_path))
    ledger.total = 2
    ledger.open(fresh=True)
    ledger.record("bad", False, "boom", 1.0)
    ledger.record("good", True, "", 1.0)
    os.close(ledger._fds["failed_tasks.txt"])   # its writes fail from now on
    try:
        error = ledger.write()
        assert "cannot record bad\tboom in failed_tasks.txt" in error
        with open(tmp_path / "successful_tasks.txt") as stream:
            assert stream.read() == "good\n"
    finally:
        del ledger._fds["failed_tasks.txt"]
        ledger.close()

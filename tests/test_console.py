"""The console of a running sweep, driven through a pipe; `threadward status`; signals.

Tasks wait on "gate" files (gates/<x> or gates/all in the project) and leave
marker files in state/, so every step waits on an event, never on the clock.
"""

import json
import os
import re
import signal
import threading

import psutil
import pytest

import threadward
from conftest import (TASK_IMPORTS_WAIT_FOR, assert_no_processes_left, needs_gputil,
                      processes_of, relayed, wait_for)

GATED_TASK = TASK_IMPORTS_WAIT_FOR + """
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project
STATE = os.path.join(HERE, "state")
GATES = os.path.join(HERE, "gates")
_worker = {}


def _mark(name, text=""):
    os.makedirs(STATE, exist_ok=True)
    path = os.path.join(STATE, name)
    with open(path + ".tmp%d" % os.getpid(), "w") as stream:
        stream.write(text)
    os.replace(path + ".tmp%d" % os.getpid(), path)


def before_all_tasks():
    _mark("before_all_tasks")


def after_all_tasks():
    _mark("after_all_tasks")


def before_each_worker(worker_id):
    _worker["id"] = worker_id
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    usage = os.environ.get("FAKE_GPU_USAGE_DIR")
    if usage and gpus:   # what the fake nvidia-smi reports for this process
        mib = 300 + 400 * worker_id
        with open(os.path.join(usage, str(os.getpid())), "w") as stream:
            for index in gpus.split(","):
                stream.write("GPU-%08d-fake-4000-8000-%012d %d\\n"
                             % (int(index), int(index), mib))
    _mark("worker_%d_started" % worker_id, json.dumps({"pid": os.getpid(), "gpus": gpus}))


def after_each_worker(worker_id):
    _mark("worker_%d_finished" % worker_id)


def task_method(variables, task_folder, log_file):
    x = variables["x"]
    with open(os.path.join(task_folder, "worker.txt"), "w") as stream:
        stream.write(str(_worker["id"]))
    if os.environ.get("TEST_TASK_CHILD"):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", HERE])
    if os.environ.get("TEST_TASK_BIG_CHILD") and x == 1:   # 150 MiB, touched, in a child
        subprocess.Popen([sys.executable, "-c", "import sys, time; b = b'x' * (150 << 20); "
                          "open(sys.argv[1], 'w').close(); time.sleep(300)",
                          os.path.join(HERE, "big_child_ready")])
    _mark("task_%s_started" % x, str(_worker["id"]))
    wait_for(lambda: os.path.exists(os.path.join(GATES, str(x))) or
             os.path.exists(os.path.join(GATES, "all")), timeout=120,
             message="the gate of task %s to open" % x)
    _mark("task_%s_finished" % x)
"""

VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(1, %d)))
"""

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(.*)$")
HEADER = re.compile(r"^\s*ID\s+PID\b")


class Console:
    """A background `threadward run` with its stdout collected line by line."""

    def __init__(self, project, process):
        self.project = project
        self.process = process
        self.out, self.err = [], []
        self._cursor = 0
        self._closed = False
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                         for stream, into in ((process.stdout, self.out),
                                              (process.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, into):
        for line in iter(stream.readline, ""):
            with self._lock:
                into.append(line.rstrip("\n"))
        if into is self.out:
            self._closed = True

    def send(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def transcript(self):
        return "\n".join(["--- stdout"] + self.out + ["--- stderr"] + self.err)

    def expect(self, pattern, timeout=60):
        """The next stdout line (after earlier matches) matching pattern."""
        regex = re.compile(pattern)
        found = []

        def search():
            with self._lock:
                for index in range(self._cursor, len(self.out)):
                    if regex.search(self.out[index]):
                        self._cursor = index + 1
                        found.append(self.out[index])
                        return True
                return self._closed
        wait_for(search, timeout=timeout, message=lambda: "a line matching %r in:\n%s"
                 % (pattern, self.transcript()))
        assert found, "no line matching %r in:\n%s" % (pattern, self.transcript())
        return found[0]

    def show(self):
        """Send `show`; return (the table's lines, {worker id: (pid, gpus, rest)})."""
        self.send("show")
        self.send("help")   # its output follows the table and marks its end
        self.expect(r"^elapsed\b")
        start = self._cursor - 1
        self.expect(HEADER.pattern)
        self.expect(r"\bremove N\b")
        table = [line for line in self.out[start:self._cursor - 1]]
        rows = {}
        for line in table:
            match = ROW.match(line)
            if match:
                rows[int(match.group(1))] = (int(match.group(2)), match.group(3),
                                             match.group(4))
        return table, rows

    def finish(self, timeout=60):
        try:
            self.process.stdin.close()
        except (OSError, ValueError):
            pass
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return code


@pytest.fixture
def gated(project):
    """gated(resources, tasks=N, env=None) starts a run of GATED_TASK; returns a Console."""
    started = []

    def start(resources="NUM_WORKERS = 2\n", tasks=4, env=None):
        project.write(task=GATED_TASK, variables=VARIABLES % (tasks + 1), resources=resources)
        process = project.start(env=env, start_new_session=True)
        console = Console(project, process)
        started.append(console)
        return console
    yield start
    open_gate(project)   # whatever happened, let every task end
    for console in started:
        if console.process.poll() is None:
            try:
                console.finish(60)
            except Exception:
                os.killpg(console.process.pid, signal.SIGKILL)
                console.process.wait(10)


def state(project, name):
    path = os.path.join(project.dir, "state", name)
    if not os.path.exists(path):
        return None
    with open(path) as stream:
        return stream.read()


def open_gate(project, name="all"):
    gates = os.path.join(project.dir, "gates")
    os.makedirs(gates, exist_ok=True)
    open(os.path.join(gates, str(name)), "w").close()


def started_tasks(project):
    """{x: worker id} of the tasks that have started."""
    folder = os.path.join(project.dir, "state")
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = re.match(r"task_(\d+)_started$", name)
        if match:
            found[int(match.group(1))] = int(state(project, name))
    return found


def wait_started(project, count):
    wait_for(lambda: len(started_tasks(project)) >= count, timeout=60)
    return started_tasks(project)


def worker(project, worker_id):
    """What worker ``worker_id`` recorded at start: {"pid": ..., "gpus": ...}."""
    text = wait_for(lambda: state(project, "worker_%d_started" % worker_id), timeout=60)
    return json.loads(text)


def worker_events(project):
    """The "worker" lines of events.jsonl, in order."""
    with open(os.path.join(project.queue, "events.jsonl")) as stream:
        return [event for event in map(json.loads, stream) if event["event"] == "worker"]


def workers_that_ran(project):
    """{task ID: worker id} from the worker.txt every task wrote."""
    ran = {}
    for name in os.listdir(project.outputs):
        with open(os.path.join(project.outputs, name, "worker.txt")) as stream:
            ran[name] = int(stream.read())
    return ran


# -- show ----------------------------------------------------------------------

@needs_gputil
def test_show_lists_live_worker_pids_and_each_workers_own_gpu_memory(
        project, gated, fake_gpus, tmp_path):
    usage = tmp_path / "gpu_usage"
    usage.mkdir()
    fake_gpus(2, FAKE_GPU_USAGE_DIR=str(usage))
    console = gated("NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 0.5\n", tasks=4)
    wait_started(project, 2)
    pids = {i: worker(project, i)["pid"] for i in (0, 1)}
    own = {i: threadward._format_bytes((300 + 400 * i) * 1024 * 1024) for i in (0, 1)}
    whole_card = threadward._format_bytes(1000 * 1024 * 1024)

    def table_with_gpu_memory():
        # GPU memory comes from nvidia-smi, sampled about every 2 s
        table, rows = console.show()
        return (table, rows) if all(own[i] in rows.get(i, ("", "", ""))[2]
                                    for i in (0, 1)) else None
    table, rows = wait_for(table_with_gpu_memory, interval=0.5)

    assert sorted(rows) == [0, 1]
    for worker_id, (pid, gpus, rest) in rows.items():
        assert pid == pids[worker_id]
        process = psutil.Process(pid)
        assert process.is_running()
        assert threadward.WORKER_MODE in process.cmdline()
        assert gpus == "0"
        assert "busy" in rest
        other = own[1 - worker_id]
        assert own[worker_id] in rest and other not in rest and whole_card not in rest
    assert any("elapsed" in line and "ETA" in line for line in table)
    assert any(re.search(r"0 succeeded, 0 failed", line) for line in table)
    assert all(len(line) <= 100 for line in table), "\n".join(table)

    open_gate(project)
    assert console.finish() == 0, console.transcript()
    assert len(project.successful()) == 4


def test_show_counts_the_memory_of_a_tasks_child_processes(project, gated):
    console = gated("NUM_WORKERS = 1\n", tasks=2, env={"TEST_TASK_BIG_CHILD": "1"})
    wait_for(lambda: os.path.exists(os.path.join(project.dir, "big_child_ready")), timeout=60)
    _, rows = console.show()
    pid, _, rest = rows[0]
    ram_now = rest.split()[-2].split("/")[0]          # e.g. "171.3M"
    assert ram_now.endswith("M") and float(ram_now[:-1]) > 150, rest
    assert psutil.Process(pid).memory_info().rss < 100 << 20   # the worker alone is small
    open_gate(project)
    assert console.finish() == 0, console.transcript()


# -- quit and SIGTERM -----------------------------------------------------------

def assert_stopped_after_the_running_task(project, console, running):
    assert console.finish() == 1, console.transcript()
    assert project.successful() == [str(x) for x in running]
    assert project.failed() == {}
    assert sorted(started_tasks(project)) == sorted(running), "a new task started"
    assert state(project, "after_all_tasks") is not None
    assert state(project, "worker_0_finished") is not None


def test_quit_lets_the_running_task_finish_and_starts_no_other(project, gated):
    console = gated("NUM_WORKERS = 1\n", tasks=3)
    running = sorted(wait_started(project, 1))
    console.send("quit")
    console.expect(r"(?i)quit")
    console.send("q")
    console.expect(r"(?i)already stopping")
    assert console.process.poll() is None
    open_gate(project)
    assert_stopped_after_the_running_task(project, console, running)
    assert state(project, "task_%d_finished" % running[0]) is not None


# -- tasks queued ahead (short tasks) -------------------------------------------

def test_quit_takes_back_the_task_queued_behind_the_running_one(project, gated, tmp_path):
    """After short tasks the next task is sent before the running one ends;
    `quit` takes it back (the worker answers while its task still runs)."""
    resources, log = relayed(tmp_path)
    for x in (1, 2, 3):
        open_gate(project, x)   # three short tasks, then task 4 waits
    console = gated(resources, tasks=6)
    wait_started(project, 4)
    wait_for(lambda: b'> {"op":"task","id":"5"' in log.read_bytes())
    assert b'"op": "result", "id": "4"' not in log.read_bytes()   # queued, not answered
    console.send("quit")
    console.expect(r"(?i)quit")
    wait_for(lambda: b'< {"op": "cancelled", "id": "5"}' in log.read_bytes())
    open_gate(project, 4)
    assert console.finish() == 1, console.transcript()
    assert project.successful() == ["1", "2", "3", "4"]
    assert sorted(started_tasks(project)) == [1, 2, 3, 4]
    assert "2 not run" in console.transcript()


def test_an_idle_worker_takes_over_a_task_queued_behind_a_long_one(project, gated):
    """At the end of the sweep nothing waits behind a long task while a worker is idle."""
    for x in range(1, 11):
        if x != 4:
            open_gate(project, x)
    console = gated("NUM_WORKERS = 2\n", tasks=10)
    wait_for(lambda: len(project.successful()) == 9, timeout=60)
    assert state(project, "task_4_finished") is None
    open_gate(project, 4)
    assert console.finish() == 0, console.transcript()
    assert sorted(project.successful(), key=int) == [str(x) for x in range(1, 11)]


def test_a_take_back_answered_between_two_tasks(project, gated):
    """The long task ends right after the take-back is asked for, so the
    worker answers it between tasks (result first, then "cancelled") rather
    than from its watchdog: the idle worker is still there to run it."""
    for x in range(1, 11):
        if x != 4:
            open_gate(project, x)
    console = gated("NUM_WORKERS = 2\n", tasks=10)
    # All but 4 and (usually) the one queued behind it; 9 if none was queued.
    wait_for(lambda: len(project.successful()) >= 8, timeout=60)
    open_gate(project, 4)
    assert console.finish() == 0, console.transcript()
    assert sorted(project.successful(), key=int) == [str(x) for x in range(1, 11)]


def test_an_idle_worker_does_not_wait_for_a_removed_workers_long_task(project, gated):
    """`remove` takes back whatever the removed worker has not started, but
    the task it runs is its own: a worker with nothing left to do shuts down
    (freeing its GPU) without waiting for that task to end."""
    console = gated("NUM_WORKERS = 2\n", tasks=4)
    running = wait_started(project, 2)
    task_of_0 = next(x for x, w in running.items() if w == 0)
    console.send("remove 0")
    console.expect(r"(?i)remove.*\b0\b")
    for x in range(1, 5):
        if x != task_of_0:
            open_gate(project, x)
    wait_for(lambda: state(project, "worker_1_finished") is not None, timeout=60)
    assert state(project, "task_%d_finished" % task_of_0) is None
    open_gate(project, task_of_0)
    assert console.finish() == 0, console.transcript()
    assert len(project.successful()) == 4


def test_sigterm_behaves_like_quit(project, gated):
    console = gated("NUM_WORKERS = 1\n", tasks=3)
    running = sorted(wait_started(project, 1))
    console.process.send_signal(signal.SIGTERM)
    console.expect(r"SIGTERM")
    open_gate(project)
    assert_stopped_after_the_running_task(project, console, running)


# -- add -------------------------------------------------------------------------

def test_add_starts_a_worker_that_runs_tasks(project, gated):
    console = gated("NUM_WORKERS = 1\n", tasks=5)
    wait_started(project, 1)
    console.send("add")
    console.expect(r"(?i)add.*\b1\b")
    wait_for(lambda: 1 in started_tasks(project).values(), timeout=60)
    assert worker(project, 1)["gpus"] == ""
    open_gate(project)
    assert console.finish() == 0, console.transcript()
    assert len(project.successful()) == 5
    assert set(workers_that_ran(project).values()) == {0, 1}
    starts = [(e["worker"], e["why"]) for e in worker_events(project) if e["state"] == "start"]
    assert starts == [(0, "start"), (1, "add")]


@needs_gputil
def test_add_takes_a_gpu_from_the_reserve(project, gated, fake_gpus):
    fake_gpus(2)
    console = gated("NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\n", tasks=4)
    wait_started(project, 1)
    assert worker(project, 0)["gpus"] == "0"
    console.send("a")
    console.expect(r"(?i)add.*\b1\b")
    assert worker(project, 1)["gpus"] == "1"
    wait_for(lambda: 1 in started_tasks(project).values(), timeout=60)
    open_gate(project)
    assert console.finish() == 0, console.transcript()
    assert len(project.successful()) == 4


@needs_gputil
def test_add_without_gpus_in_reserve_says_why_and_changes_nothing(project, gated, fake_gpus):
    fake_gpus(2)
    console = gated("NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 1\n", tasks=4)
    wait_started(project, 2)
    console.send("add")
    line = console.expect(r"(?i)\badd\b")
    assert re.search(r"(?i)reserve|GPU", line), line
    _, rows = console.show()
    assert sorted(rows) == [0, 1]
    open_gate(project)
    assert console.finish() == 0, console.transcript()
    assert len(project.successful()) == 4
    assert state(project, "worker_2_started") is None
    assert set(workers_that_ran(project).values()) <= {0, 1}


# -- remove ----------------------------------------------------------------------

def test_remove_runs_after_each_worker_and_the_worker_takes_no_further_task(project, gated):
    console = gated("NUM_WORKERS = 2\n", tasks=6)
    running = wait_started(project, 2)
    task_of_1 = next(x for x, w in running.items() if w == 1)
    console.send("remove 1")
    console.expect(r"(?i)remove.*\b1\b")
    assert state(project, "worker_1_finished") is None   # it finishes its task first
    open_gate(project, task_of_1)
    wait_for(lambda: state(project, "worker_1_finished") is not None, timeout=60)
    assert state(project, "task_%d_finished" % task_of_1) is not None
    open_gate(project)
    assert console.finish() == 0, console.transcript()
    assert len(project.successful()) == 6
    ran = workers_that_ran(project)
    assert [task for task, w in ran.items() if w == 1] == [str(task_of_1)]
    assert state(project, "worker_0_finished") is not None
    record = worker_events(project)
    assert [e["state"] for e in record if e["worker"] == 1] == ["start", "ready", "remove",
                                                                "stop", "exit"]
    assert {e["worker"]: (e["cause"], e["code"]) for e in record if e["state"] == "exit"} == \
        {0: ("shut down", 0), 1: ("shut down", 0)}


@needs_gputil
def test_a_removed_workers_gpu_goes_back_to_the_reserve(project, gated, fake_gpus):
    fake_gpus(2)
    console = gated("NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 1\n", tasks=6)
    running = wait_started(project, 2)
    task_of_1 = next(x for x, w in running.items() if w == 1)
    gpu_of_1 = worker(project, 1)["gpus"]
    console.send("r 1")
    console.expect(r"(?i)remove.*\b1\b")
    open_gate(project, task_of_1)
    wait_for(lambda: 1 not in console.show()[1], timeout=60, interval=0.2)
    console.send("add")
    console.expect(r"(?i)add.*\b2\b")
    assert worker(project, 2)["gpus"] == gpu_of_1
    wait_for(lambda: 2 in started_tasks(project).values(), timeout=60)
    open_gate(project)
    assert console.finish() == 0, console.transcript()
    assert len(project.successful()) == 6


# -- help, mistakes, end of input ------------------------------------------------

def test_help_unknown_commands_and_unknown_workers(project, gated):
    console = gated("NUM_WORKERS = 2\n", tasks=2)
    wait_started(project, 2)
    for command in ("help", "h"):
        console.send(command)
        for name in ("show", "quit", "add", "remove", "help"):
            console.expect(r"\b%s\b" % name)
    console.send("frobnicate")
    line = console.expect(r"frobnicate")
    for name in ("show", "quit", "add", "remove", "help"):
        assert name in line, "one line naming the commands: %r" % line
    console.send("remove 99")
    line = console.expect(r"(?i)remove")
    assert re.search(r"99|unknown|no such|\b0, 1\b", line), line
    console.send("remove")
    console.expect(r"(?i)remove")
    _, rows = console.show()
    assert sorted(rows) == [0, 1] and "removing" not in " ".join(r[2] for r in rows.values())
    open_gate(project)
    assert console.finish() == 0, console.transcript()
    assert len(project.successful()) == 2
    assert console.err == [], console.transcript()


def test_end_of_input_ends_the_console_but_not_the_run(project, gated):
    console = gated("NUM_WORKERS = 1\n", tasks=3)
    first = sorted(wait_started(project, 1))[0]
    console.process.stdin.close()
    open_gate(project, first)
    wait_started(project, 2)      # the run went on after end of input
    assert console.process.poll() is None
    open_gate(project)
    assert console.finish() == 0, console.transcript()
    assert sorted(project.successful()) == ["1", "2", "3"]


# -- threadward status -----------------------------------------------------------

def test_status_from_another_process_prints_the_show_table(project, gated):
    console = gated("NUM_WORKERS = 2\n", tasks=4)
    wait_started(project, 2)
    pids = {i: worker(project, i)["pid"] for i in (0, 1)}
    status_file = os.path.join(project.queue, "status.json")

    def status_with_both_busy():
        # rewritten about every 2 s; wait for one written while both are busy
        try:
            with open(status_file) as stream:
                text = json.load(stream)["show"]
        except (OSError, ValueError, KeyError):
            return None
        return text if text.count("busy") == 2 else None
    wait_for(status_with_both_busy, interval=0.2)

    result = project.run(subcommand="status")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    table, rows = console.show()
    printed_rows = {}
    for line in printed:
        match = ROW.match(line)
        if match:
            printed_rows[int(match.group(1))] = (int(match.group(2)), match.group(3))
    assert {i: row[0] for i, row in printed_rows.items()} == pids
    assert {i: row[:2] for i, row in rows.items()} == printed_rows
    assert [x for x in printed if HEADER.match(x)] == [x for x in table if HEADER.match(x)]
    assert [x for x in printed if x.startswith("tasks:")] == \
        [x for x in table if x.startswith("tasks:")]
    open_gate(project)
    assert console.finish() == 0, console.transcript()
    # after the run: its last view, with nothing to wait for
    after = project.run(subcommand="status").stdout
    assert after.startswith("the run finished; its last status")
    assert "ETA" not in after and re.search(r"^elapsed \S+   finished   per task", after, re.M)
    assert "4 succeeded, 0 failed, 0 skipped (done before), 0 not run of 4" in after, after


def test_status_without_a_run_says_so(project):
    result = project.run(subcommand="status")
    assert result.returncode != 0
    assert "status" in result.stderr and "Traceback" not in result.stderr


# -- Ctrl-C to the whole process group --------------------------------------------

def test_first_ctrl_c_lets_running_tasks_complete(project, gated):
    console = gated("NUM_WORKERS = 2\n", tasks=5)
    running = sorted(wait_started(project, 2))
    os.killpg(console.process.pid, signal.SIGINT)
    console.expect(r"press Ctrl-C again")
    assert console.process.poll() is None
    open_gate(project)
    assert console.finish() == 1, console.transcript()
    assert sorted(project.successful()) == [str(x) for x in running]
    assert project.failed() == {}
    assert sorted(started_tasks(project)) == running
    assert state(project, "after_all_tasks") is not None
    for worker_id in (0, 1):
        assert state(project, "worker_%d_finished" % worker_id) is not None


def test_second_ctrl_c_ends_running_tasks_as_interrupted(project, gated):
    console = gated("NUM_WORKERS = 2\n", tasks=5, env={"TEST_TASK_CHILD": "1"})
    running = sorted(wait_started(project, 2))
    # each task started a child process that names the project: it must end too
    wait_for(lambda: len([p for p in processes_of(project.dir)
                          if "time.sleep(300)" in " ".join(p.cmdline())]) == 2)
    os.killpg(console.process.pid, signal.SIGINT)
    console.expect(r"press Ctrl-C again")
    os.killpg(console.process.pid, signal.SIGINT)
    assert console.finish() == 1, console.transcript()
    assert project.successful() == []
    assert project.failed() == {str(x): "interrupted" for x in running}
    assert not any(state(project, "task_%d_finished" % x) for x in running)
    assert sorted(started_tasks(project)) == running
    assert state(project, "after_all_tasks") is not None
    assert_no_processes_left(project.dir)

"""Shared fixtures: a temporary threadward project driven through the real CLI."""

import contextlib
import functools
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADWARD = os.path.join(ROOT, "threadward.py")
FAKE_BIN = os.path.join(ROOT, "tests", "fake_bin")

sys.path.insert(0, ROOT)

MINIMAL_TASK = """
def task_method(variables, task_folder, log_file):
    print("running", variables)
"""
MINIMAL_VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3])
"""
MINIMAL_RESOURCES = """
NUM_WORKERS = 2
"""


class Project:
    """A project folder under tmp_path with helpers to write, run and read it."""

    def __init__(self, directory):
        self.dir = str(directory)
        self.config = os.path.join(self.dir, "threadward")
        self.queue = os.path.join(self.config, "task_queue")
        self.outputs = os.path.join(self.config, "task_outputs")
        os.makedirs(self.queue, exist_ok=True)
        self.write(task=MINIMAL_TASK, variables=MINIMAL_VARIABLES, resources=MINIMAL_RESOURCES)

    def write(self, task=None, variables=None, resources=None):
        """Replace any of the three project files with the given (dedented) source."""
        for name, text in (("task_specification.py", task),
                           ("variable_iteration.py", variables),
                           ("resource_constraints.py", resources)):
            if text is not None:
                with open(os.path.join(self.config, name), "w") as stream:
                    stream.write(textwrap.dedent(text))

    def command(self, *args, subcommand="run"):
        return [sys.executable, THREADWARD, subcommand, self.dir] + list(args)

    def env(self, extra=None):
        env = dict(os.environ)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.update(extra or {})
        return env

    def run(self, *args, stdin=subprocess.DEVNULL, input=None, timeout=120, env=None,
            subcommand="run"):
        """Run `threadward run DIR ARGS` to the end; returns CompletedProcess (text)."""
        if input is not None:
            stdin = None
        return subprocess.run(self.command(*args, subcommand=subcommand), stdin=stdin,
                              input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout, env=self.env(env))

    def start(self, *args, env=None, **kwargs):
        """Start `threadward run` in the background with stdin/stdout pipes."""
        return subprocess.Popen(self.command(*args), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, env=self.env(env), **kwargs)

    def lines(self, name):
        path = os.path.join(self.queue, name)
        if not os.path.exists(path):
            return []
        with open(path) as stream:
            return [line for line in stream.read().split("\n") if line]

    def successful(self):
        return self.lines("successful_tasks.txt")

    def failed(self):
        """{task_id: reason} from failed_tasks.txt."""
        return dict((line.split("\t", 1) + [""])[:2] for line in self.lines("failed_tasks.txt"))

    def all_tasks(self):
        with open(os.path.join(self.queue, "all_tasks.json")) as stream:
            return json.load(stream)

    def output(self, *parts):
        with open(os.path.join(self.outputs, *parts)) as stream:
            return stream.read()

    def log(self, task_id):
        return self.output(*(task_id.split("/") + ["task.log"]))


def wait_for(condition, timeout=60, message=None, interval=0.02):
    """Wait until ``condition()`` returns a true value; return that value.

    The one waiting helper of the suite (task code that runs in threadward's
    workers imports it too: see TASK_IMPORTS_WAIT_FOR), for events in other
    processes: a file appears, a run prints a line, processes end.

    ``timeout`` (seconds) is a generous upper bound that only stops a test
    that would otherwise hang; no test relies on anything happening within
    it, so a slow or loaded machine fails none.  ``message`` says what was
    awaited (a string, or a function called at the timeout to describe what
    was seen instead); without one, the condition's source line is shown.
    The condition is checked once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if callable(message):
        message = message()
    if message is None:
        try:
            message = inspect.getsource(condition).strip()
        except (OSError, TypeError):
            message = getattr(condition, "__qualname__", repr(condition))
    raise AssertionError("timed out after %g s waiting for: %s" % (timeout, message))


def read_until(stream, text, timeout=60):
    """What a child wrote on the pipe ``stream`` up to (at least) ``text``.

    Raw reads on the fd, so nothing waits unseen in a Python buffer, and the
    rest is left for communicate(); fails at once if the pipe ends first."""
    fd = stream.fileno()
    seen = bytearray()

    def arrived():
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return False
        if not chunk:
            raise AssertionError("the output ended before %r; it was: %r" % (text, bytes(seen)))
        seen.extend(chunk)
        return text.encode() in seen
    os.set_blocking(fd, False)
    try:
        wait_for(arrived, timeout=timeout,
                 message=lambda: "%r on the output; so far: %r" % (text, bytes(seen)))
    finally:
        os.set_blocking(fd, True)
    return seen.decode()


@contextlib.contextmanager
def started(project, *args):
    """`threadward run DIR ARGS` in the background (Project.start), killed
    on the way out if it is still running (a failed assertion)."""
    process = project.start(*args)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def run_until(project, stdin, text, gate):
    """Run the project with ``stdin`` (a file or fd), wait until it has
    printed ``text``, then touch ``gate`` (a pathlib.Path its tasks wait
    for) and let it finish: a CompletedProcess with all of its output."""
    process = subprocess.Popen(project.command(), stdin=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True,
                               env=project.env())
    try:
        seen = read_until(process.stdout, text)
        gate.touch()
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, seen + out, err)


HANGING_TASK_ZERO = """
import os, time
%s
def task_method(variables, task_folder, log_file):
    if variables["x"] == 0:
        with open(%r, "w") as stream:
            stream.write(str(os.getpid()))
        time.sleep(3600)
"""


def sigterm_task_zero(project, tmp_path, variables, settings=""):
    """Run 2 workers where task x = 0 hangs, SIGTERM its worker from
    outside (as Slurm preempting a step), and let the run end: (rc, out, err)."""
    started = tmp_path / "started"
    project.write(task=HANGING_TASK_ZERO % (settings, str(started)), variables=variables,
                  resources="NUM_WORKERS = 2\n")
    process = project.start()
    pid = int(wait_for(lambda: started.exists() and started.read_text()))
    os.kill(pid, signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


# Task code runs in threadward's workers, not under pytest, but on this same
# interpreter: this line (put at the top of a task file) gives it wait_for.
TASK_IMPORTS_WAIT_FOR = ("import sys as _sys\n_sys.path.append(%r)\n"
                         "from conftest import wait_for\n" % os.path.join(ROOT, "tests"))


RELAY = r"""
import subprocess, sys, threading
# A launcher that passes the protocol through both ways, logging each line
# ("> " from the main process, "< " from the worker) in the order it passed.
log = open(sys.argv[1], "ab", buffering=0)
lock = threading.Lock()
worker = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

def pump(source, sink, tag):
    for line in iter(source.readline, b""):
        with lock:
            log.write(tag + line)
        sink.write(line)
        sink.flush()
    sink.close()

threading.Thread(target=pump, args=(sys.stdin.buffer, worker.stdin, b"> "), daemon=True).start()
pump(worker.stdout, sys.stdout.buffer, b"< ")
sys.exit(worker.wait())
"""


def relayed(tmp_path):
    """Resources for one worker behind RELAY, and the protocol log's path."""
    relay, log = tmp_path / "relay.py", tmp_path / "protocol.log"
    relay.write_text(RELAY)
    log.write_bytes(b"")
    return ("NUM_WORKERS = 1\nLAUNCHER = [%r, %r, %r]\n"
            % (sys.executable, str(relay), str(log))), log


def processes_of(directory):
    """Live processes whose command line mentions the project directory."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(directory in part for part in process.info["cmdline"] or ()):
                found.append(process)
        except (psutil.Error, TypeError):
            pass
    return found


@pytest.fixture
def project(tmp_path):
    """A minimal runnable project; after the test no process of it may be left."""
    made = Project(tmp_path / "proj")
    yield made
    assert_no_processes_left(made.dir)


def assert_no_processes_left(directory, timeout=60):
    """Wait until no process of the project at ``directory`` is alive."""
    wait_for(lambda: not processes_of(directory), timeout=timeout,
             message=lambda: "the processes of %s to end; still alive: %s" % (
                 directory, [process.info["cmdline"] for process in processes_of(directory)]))


@functools.lru_cache(maxsize=None)
def gputil_problem():
    """Why GPUtil cannot be imported by the runs' interpreter (this one), or
    None.  Any failure counts: GPUtil imports distutils, which Python 3.12
    dropped (setuptools brings it back).  Tried in a child, so that this
    process does not import distutils before setuptools can replace it; and
    only when a test asks (task code imports this module too)."""
    tried = subprocess.run([sys.executable, "-c", "import GPUtil"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=120)
    if tried.returncode == 0:
        return None
    lines = tried.stdout.strip().splitlines()
    return lines[-1] if lines else "exit code %d" % tried.returncode


# For a test whose runs ask for GPUs: threadward finds them through GPUtil,
# and without it such a run is refused, so the test is skipped at once.
needs_gputil = pytest.mark.needs_gputil


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_gputil: skipped where GPUtil cannot be imported")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_gputil") is not None and gputil_problem() is not None:
        pytest.skip("GPU runs need GPUtil, which cannot be imported here (%s); "
                    "pip install GPUtil setuptools" % gputil_problem())


@pytest.fixture
def fake_gpus(monkeypatch):
    """Put the fake nvidia-smi first on PATH; returns a function setting the GPU count."""
    monkeypatch.setenv("PATH", FAKE_BIN + os.pathsep + os.environ["PATH"])

    def set_count(count, **extra):
        monkeypatch.setenv("FAKE_GPU_COUNT", str(count))
        for key, value in extra.items():
            monkeypatch.setenv(key, value)
    set_count(4)
    return set_count

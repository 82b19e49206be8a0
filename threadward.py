#!/usr/bin/env python3
"""threadward: run one Python task over every combination of variables, on
persistent subprocess workers that keep what they have loaded.

Usage::

    threadward init [DIR]      # write DIR/threadward/ from templates/ (or short ones)
    threadward run [DIR]       # expand the variables, start workers, run
    threadward run --only model=gpt2 --limit 1 [DIR]   # a part of the sweep first
    threadward status [DIR]    # what a running sweep is doing (from its status file)
    threadward results [DIR]   # one row per task: status, seconds, variables, result.json
    threadward report [DIR]    # threadward/report.html: timeline, loads, resources, failures

(`python -m threadward ...` and `python threadward.py ...` work the same.)

From Python, without project files (settings and hooks as keywords)::

    variables = threadward.VariableSet()
    variables.add_variable(name="model", values=["gpt2", "bert"], to_value=mylib.load_model)
    code = threadward.Threadward(directory="runs/exp1", task=mylib.train,
                                 variables=variables, num_workers=4).run()

Data flow (one thread in the main process; nothing blocks but the select)::

    variable_iteration.py --> VariableSet --> all_tasks.json (streamed)
                                   |
                                   v
                              _Scheduler (prefix tree of remaining tasks)
                                   |  assign(worker): longest retained prefix,
                                   |  or None while no task is worth its load
                                   v
    console stdin ---+     +----------------+    task line    +-----------+
    signals (wakeup)-+---> | selector loop  | --------------> | worker 0  |
    nvidia-smi pipe -+     |  (Threadward)  | <-------------- | (Worker)  |
    worker stdouts --+     +----------------+   result line   +-----------+
                                   |                            ...  N
                                   v
                successful_tasks.txt / failed_tasks.txt / events.jsonl (whole lines only)

* The main process loads the three project files, expands the variables,
  writes ``task_queue/all_tasks.json``, runs ``before_all_tasks`` and
  ``after_all_tasks``, owns the scheduler, the console and the result files.
* A worker is ``sys.executable`` loading this file in worker mode, in its
  own process group, with ``CUDA_VISIBLE_DEVICES`` set to its GPUs.  It runs
  the worker and task hooks, converts variable values (keeping them while they
  stay the same) and sends one result line per task.

Protocol (newline-delimited, on the worker's private copies of fd 0 and 1)::

    parent -> worker   {"op": "task", "id": ..., "folder": ..., "log": ...,
                        "vars": [[name, value, nickname], ...]}
                       CANCEL      (drop every task sent before it and not yet started)
                       SHUT_DOWN
    worker -> parent   {"op": "ready", "pid": ..., "host": ..., "gpus": CUDA_VISIBLE_DEVICES}
                       {"op": "result", "id": ..., "status": 0|1, "reason": ..., "seconds": ...,
                        "load": seconds of it spent in converters (when any ran),
                        "converted": levels whose converters ran for it (when any did),
                        "terminated": true if SIGTERM ended it (the worker then exits)}
                       {"op": "cancelled", "id": ...}         (answers a cancel, per task)
                       {"op": "terminated"}   (SIGTERM came between tasks: it exits now)
                       {"op": "fatal", "error": ...}          (start-up failed)
                       {"op": "stats", "cpu": ..., "rss": ..., "gpu": ...}
                                  (every 2 s, from workers behind a launcher: srun, ssh)

A worker whose last task was short (under QUEUE_AHEAD_BELOW) is sent its next
task before it answers the current one, so it never waits for the parent's
round trip; results still come in order, and a cancel takes back queued tasks
(quit, `remove`, a worker idle at the end of the sweep) before they start.

If the worker's stdin hangs up (the parent, or the srun / ssh between them,
is gone), a watchdog thread ends the running task and the worker at once.

Everything a task prints, at the Python or the file-descriptor level and from
child processes, goes to the task's log; nothing it prints or reads can reach
the protocol channel.  Selecting on pipes and stdin is POSIX-only.

Vendoring: copy this file next to your code (with ``templates/`` beside it,
``init`` writes the full, commented templates; without, short versions built
in); it needs only ``psutil`` and, for GPUs, ``GPUtil``.
"""

__version__ = "0.1.0"
__license__ = "MIT"
__all__ = ["VariableSet", "Task", "Worker", "Threadward", "ThreadwardError",
           "ConfigError", "results", "report", "main"]


###############################################################################
# Imports and compatibility ###################################################
###############################################################################

# argparse, ast and shutil are imported where they are used: workers never
# need them, and they were a third of this module's import time, which every
# worker start pays.
import collections
import errno
import gc
import importlib.util
import itertools
import json
import math
import os
import select
import selectors
import shlex
import signal
import site
import subprocess
import sys
import threading
import time
import traceback
import types

_POSIX = os.name == "posix"

# PollSelector, not DefaultSelector: epoll refuses to register /dev/null and
# regular files, which is what stdin is under nohup, sbatch or `< cmds.txt`.
# A module alias so that tests can force SelectSelector (as test_subprocess does).
_Selector = getattr(selectors, "PollSelector", selectors.SelectSelector)


def _import_psutil():
    """psutil, or None: monitoring is optional, running is not."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _import_gputil():
    """GPUtil, or raise ConfigError saying why it cannot be used."""
    try:
        import GPUtil
    except Exception as exc:  # GPUtil imports distutils: gone in 3.12+ without setuptools
        raise ConfigError(
            "GPUs were requested but GPUtil cannot be imported (%s: %s); "
            "install it with: pip install GPUtil setuptools"
            % (type(exc).__name__, exc))
    return GPUtil


###############################################################################
# Constants ###################################################################
###############################################################################

WORKER_MODE = "__threadward_worker__"   # argv[1] that turns main() into a worker

SUCCESS_CONDITIONS = ("NO_ERROR_AND_VERIFY", "NO_ERROR_ONLY", "VERIFY_ONLY", "ALWAYS_SUCCESS")
OUTPUT_MODES = ("LOG_FILE_ONLY", "CONSOLE_ONLY", "LOG_FILE_AND_CONSOLE")
FAILURE_HANDLINGS = ("PRINT_FAILURE_AND_CONTINUE", "SILENT_CONTINUE", "STOP_EXECUTION")
FOLDER_LOCATIONS = ("VARIABLE_SUBFOLDER", "VARIABLE_UNDERSCORE")

TASK_HOOKS = ("before_each_task", "after_each_task", "verify_task_success")
WORKER_HOOKS = ("before_each_worker", "after_each_worker")
MAIN_HOOKS = ("before_all_tasks", "after_all_tasks")
RESULT_HOOKS = ("on_task_success", "on_task_failure")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

CONSOLE_HELP = """commands (type one and press Enter):
  show (s)        progress, and each worker's state, CPU, RAM and GPU memory
  quit (q)        no new tasks; running tasks finish, then teardown
  add (a)         start one more worker under the same constraints
  remove N (r N)  worker N takes no new task and shuts down after its current one
  help (h)        this list"""

# Seconds between SIGTERM and SIGKILL when a worker's process group is ended.
# Long enough for a task to flush and close files, short enough that a stuck
# CUDA call does not hold up a quit.
KILL_WAIT = 5.0
# Preemption: after SIGTERM, running tasks get this long before they are ended
# (the default of the SIGTERM_GRACE setting): under Slurm's usual KillWait of
# 30 s, so the interrupted tasks are recorded before SIGKILL comes.
SIGTERM_GRACE = 20.0
# Progress lines: at least every 10% of the tasks, and at least this often.
PROGRESS_INTERVAL = 30.0
# The progress bar (on a terminal, instead of progress lines) is redrawn at
# most this often: a sweep of short tasks finishes thousands a second, and
# over ssh each redraw is a packet.  The sample timer's pass (every
# STATUS_INTERVAL s) draws what a throttled one left out.
BAR_INTERVAL = 0.2
BAR_CELLS = 30   # the bar's widest; narrower terminals get a shorter one
# Colours of the bar (SGR codes): what has succeeded, what has failed.
# Left out when NO_COLOR is set (https://no-color.org).
GREEN, RED, PLAIN = "\x1b[32m", "\x1b[31m", "\x1b[0m"
# A slot whose worker fails to start this many times in a row is given up;
# the n-th retry waits n * START_RETRY_DELAY s (a host briefly down, srun busy).
MAX_START_FAILURES = 3
START_RETRY_DELAY = 1.0
# os.read size for worker pipes (what subprocess uses).
READ_SIZE = 32768
# A worker whose last task took less than this many seconds gets its next task
# queued behind the current one: for tasks this short the parent's round trip
# (a fraction of a millisecond) would otherwise be a visible share of the time.
QUEUE_AHEAD_BELOW = 0.1
# How often a worker busy with a task looks for a CANCEL of the task queued
# behind it (a thread's timed wait; between tasks it looks at once).
CANCEL_CHECK_INTERVAL = 1.0
# A worker told that no remaining task is worth its load asks again after
# this many seconds at the earliest (each ask looks at every task held; with
# many workers and short tasks, asking at every event would load the loop).
WAIT_RECHECK = 0.1
# The scheduler's join policy (its section says how it works): a running
# task looks stuck past OVERDUE_FACTOR x its expected time -- the longest task
# measured on its path, or, for one that loads, LOAD_OVERDUE_FACTOR x the
# longest load measured (a big model can take ten times a small one) plus the
# longest task.  Lower factors rescue hung tasks sooner and split branches for
# merely slow ones.  Before any task is measured, a task counts as
# UNMEASURED_TASK_SECONDS when branches are compared.
OVERDUE_FACTOR = 2.0
LOAD_OVERDUE_FACTOR = 10.0
UNMEASURED_TASK_SECONDS = 1.0
# Status file and monitoring refresh.
STATUS_INTERVAL = 2.0
NVIDIA_SMI_TIMEOUT = 10.0
# A worker's exit (the user's and multiprocessing's exit handlers, threads
# left running, a pool joining a dead child) gets this long before every
# process of it is killed: exit handlers that flush and upload (wandb,
# mlflow) have time, a hung one cannot keep the run from ending.
EXIT_WAIT = 10.0
# A SIGTERM that reaches a worker this soon after one of its task's threads
# aimed os.kill/os.killpg at the worker's process group was the task's own.
OWN_SIGNAL_WINDOW = 0.5
# Log lines of a dead worker's task shown on the console.
LOG_TAIL_LINES = 5

# The thread-count variables of the numeric libraries (OpenMP, which PyTorch
# uses, MKL, OpenBLAS, BLIS, Accelerate, numexpr, numba): each worker's are
# set to its share of the cores, unless the user set them, as loky does for
# its workers.  N workers each using every core slow each other down.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "NUMBA_NUM_THREADS")
# PIN_CPUS: the cores a worker is pinned to, "0,1", read at its start.
CPUS_ENV = "THREADWARD_CPUS"

LAUNCHERS = ("local", "slurm", "ssh")
# ssh never prompts, and gives up on a dead host instead of waiting minutes.
SSH_DEFAULTS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
# Lines of a remote launcher's stderr kept to explain a worker that failed to start.
STDERR_TAIL_LINES = 20

PROJECT_SUBDIR = "threadward"

CONFIG_FILES = ("task_specification.py", "resource_constraints.py", "variable_iteration.py")
RESULT_FILES = ("successful_tasks.txt", "failed_tasks.txt")
# The event record of the runs (task_queue/, beside the result files): one
# JSON object per line, appended, kept across runs; see _Ledger.
EVENTS_FILE = "events.jsonl"
EVENTS_SCHEMA = 2   # in each "run" line: what a reader of the record can expect
# The timeline's events (workers, tasks handed out and started, resource
# samples), beside the "run", "task" and "end" lines that `results` reads;
# bench B1 and B5 turn them off to measure what they cost.
TIMELINE_EVENTS = True
# The settings of each project file: one in the wrong file, or a name a
# letter or two off one of them, is a configuration error.
SETTINGS = {
    "task_specification.py": ("SUCCESS_CONDITION", "OUTPUT_MODE", "SIGTERM_GRACE",
                              "TASK_TIMEOUT", "RETRIES"),
    "resource_constraints.py": ("NUM_WORKERS", "NUM_GPUS_PER_WORKER", "AVOID_GPUS",
                                "INCLUDE_GPUS", "LAUNCHER", "SLURM_OPTIONS", "HOSTS",
                                "SSH_OPTIONS", "REMOTE_PYTHON", "CPUS_PER_WORKER", "PIN_CPUS"),
    "variable_iteration.py": ("FAILURE_HANDLING", "TASK_FOLDER_LOCATION"),
}


###############################################################################
# Exceptions ##################################################################
###############################################################################

class ThreadwardError(Exception):
    """Base class of every error threadward reports to the user."""


class ConfigError(ThreadwardError):
    """A mistake in the user's project files; reported before anything runs.

    ``where`` is "file:line" of the user's mistake when it is known.
    """

    def __init__(self, message, where=None):
        super().__init__(message)
        self.where = where

    def __str__(self):
        message = super().__str__()
        return "%s: %s" % (self.where, message) if self.where else message


###############################################################################
# Helpers used everywhere #####################################################
###############################################################################

def _ensure_std_fds():
    """Open /dev/null on a closed fd 0, 1 or 2, so that no pipe or result file
    of ours is ever given one of those numbers."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _stderr(message):
    try:
        sys.stderr.write("threadward: %s\n" % message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass   # the terminal is gone (SIGHUP, a closed pipe): nobody to tell


def _write_all(fd, data):
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _log_tail(path, count=LOG_TAIL_LINES):
    """The last ``count`` lines of a log ([] if it cannot be read)."""
    try:
        with open(path, "rb") as stream:
            stream.seek(max(0, os.fstat(stream.fileno()).st_size - 4096))
            return stream.read().decode("utf-8", "replace").splitlines()[-count:]
    except OSError:
        return []


def _is_terminal(fd):
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _readable_now(fd):
    """Whether ``fd`` has something to read (poll: any fd number, unlike select)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _hook_of(cache, module, name):
    """The user's function ``name`` in ``module``, or None, looked up once:
    hooks are looked up per task, and a miss on a module raises (and
    catches) an AttributeError, some microseconds each time."""
    try:
        return cache[name]
    except KeyError:
        function = cache[name] = getattr(module, name, None)
        return function


def _elide(text, width):
    """``text`` cut in the middle to ``width`` (both ends of a task ID matter)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "~" + text[len(text) - (width - 1 - head):]


def _plural(count, noun):
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def _format_duration(seconds):
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def _format_rate(per_second):
    """Tasks per second, minute or hour, whichever reads as 1 or more."""
    if not per_second:
        return "? tasks/min"
    for unit, seconds in (("s", 1), ("min", 60), ("h", 3600)):
        rate = per_second * seconds
        if rate >= 1 or unit == "h":
            return ("%.1f tasks/%s" if rate < 100 else "%d tasks/%s") % (rate, unit)


def _format_bytes(count):
    if count is None:
        return "?"
    for unit in ("B", "K", "M", "G"):
        if count < 1024 or unit == "G":
            return ("%d%s" if unit == "B" else "%.1f%s") % (count, unit)
        count /= 1024.0


def _atomic_write(path, text):
    """Write a whole file so that readers see the old or the new, never half."""
    temporary = "%s.tmp%d" % (path, os.getpid())
    with open(temporary, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def _open_log(path, go_on=False):
    """A log opened afresh (or, ``go_on``, to write after what it holds),
    never through a symbolic link planted at its name (that would truncate
    the link's target): such a link is replaced.  A task folder that is
    itself a link (to scratch storage) is fine."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | (0 if go_on else os.O_TRUNC)
    try:
        return os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    os.unlink(path)
    return os.open(path, flags, 0o666)


def _remove_stale_temporaries(folder):
    """NAME.tmpPID files whose writer is gone (a run killed mid-write; those
    of all_tasks.json grow to ~90 MB for a million tasks)."""
    for name in os.listdir(folder):
        _, dot, pid = name.rpartition(".tmp")
        if dot and pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _one_line(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _user_frame(tb, path):
    """'file:line' of the innermost traceback frame in the user's file."""
    where = None
    for frame, line in traceback.walk_tb(tb):
        if os.path.abspath(frame.f_code.co_filename) == path:
            where = "%s:%d" % (_display_path(path), line)
    return where


def _display_path(path):
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith(".." + os.sep + "..") else relative


###############################################################################
# Helpers: processes ##########################################################
###############################################################################

# Both sides use these: the main process to end a worker's whole tree, a
# worker to tell the processes it must keep from the strays of a task.

def _kill_group(pid, sig):
    """Signal a worker's whole process group; a group already gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass   # alive, but another user's
    return True


def _become_subreaper(on=True):
    """Linux: orphaned descendants are re-parented to this process, not to
    init: a worker finds a task's double-forked background process at task
    end, the main process what a worker that died left behind."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(36, int(on), 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def _child_pids(pid="self"):
    """PIDs of a process's children.  /proc/PID/task/*/children costs
    microseconds; a psutil scan of every process is the fallback."""
    try:
        pids = set()
        for thread in os.listdir("/proc/%s/task" % pid):
            fd = os.open("/proc/%s/task/%s/children" % (pid, thread), os.O_RDONLY)
            try:
                pids.update(int(child) for child in os.read(fd, 65536).split())
            finally:
                os.close(fd)
        return pids
    except FileNotFoundError:
        if os.path.isdir("/proc/self/task"):
            return set()   # the process is gone
    except (OSError, ValueError):
        pass
    psutil = _import_psutil()
    if psutil is None:
        return set()
    try:
        return {p.pid for p in psutil.Process(None if pid == "self" else pid).children()}
    except psutil.Error:
        return set()


def _has_children():
    """False only if this process has no child at all: one waitid, where a
    /proc scan costs ten system calls.  WNOWAIT leaves an exited child for
    whoever waits for it."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False
    except (AttributeError, OSError):   # no waitid here: assume there may be some
        return True


def _descendants(pids):
    """``pids`` and every descendant of them, parents before children."""
    found, stack, seen = [], list(pids), set()
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            found.append(pid)
            stack.extend(_child_pids(pid))
    return found


def _kill_descendants(pid="self"):
    """SIGKILL every descendant of ``pid`` (this process by default), those
    in sessions and process groups of their own included; again while
    orphans of the killed come back to a subreaper."""
    for _ in range(3):
        victims = _descendants(_child_pids(pid))
        if not victims:
            return
        for victim in victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except OSError:
                pass


def _end_everything(code=1):
    """(A worker.)  Kill every process under it, then itself, now."""
    _kill_descendants()
    os._exit(code)


def _end_processes(pids, grace=KILL_WAIT):
    """End ``pids`` and their descendants: SIGTERM, then SIGKILL for those
    still there after ``grace`` seconds."""
    psutil = _import_psutil()
    if psutil is None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        return
    left = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            left.extend([process] + process.children(recursive=True))
        except psutil.Error:
            pass
    for process in left:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


class _Orphans:
    """(The main process, a subreaper while it runs.)  What the tasks of a
    local worker that died left running comes to us: it is killed, then
    reaped as it goes."""

    def __init__(self):
        self.killed = set()   # not yet reaped

    def end(self, known):
        """Kill our children but ``known`` (workers, nvidia-smi, before_all_tasks'
        processes) that live, as a worker's do, in a session not ours (what a
        result hook starts lives in ours)."""
        ours = os.getsid(0)
        orphans = set()
        for pid in _child_pids() - known - self.killed:
            try:
                if os.getsid(pid) != ours:
                    orphans.add(pid)
            except OSError:
                pass
        for pid in _descendants(orphans):
            try:
                os.kill(pid, signal.SIGKILL)
                self.killed.add(pid)
            except OSError:
                pass

    def reap(self, until=None):
        """Reap those that have come to us, forget those gone; ``until``:
        wait for them up to then (at the end of the run)."""
        while self.killed:
            for pid in list(self.killed):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        self.killed.discard(pid)
                except ChildProcessError:   # not ours (yet): a killed grandchild
                    if not _pid_alive(pid):
                        self.killed.discard(pid)
            if until is None or time.monotonic() >= until:
                return
            time.sleep(0.05)   # after the loop: a killed process's exit is a moment away


def _referenced_elsewhere(items):
    """Those of ``items`` (a set) that something besides the set refers to.
    The reference count of an object in the set alone is measured on the
    same path, so the answer does not depend on the Python version."""
    def counts(members):
        return [(member, sys.getrefcount(member)) for member in tuple(members)]
    (_, alone), = counts({object()})
    return [member for member, count in counts(items) if count > alone]


# Helper processes that a multiprocessing-family library starts once per
# process and reuses for as long as the process lives: (module, object, pid).
_POOL_HELPERS = (
    ("multiprocessing.resource_tracker", "_resource_tracker", "_pid"),
    ("multiprocessing.forkserver", "_forkserver", "_forkserver_pid"),
    ("joblib.externals.loky.backend.resource_tracker", "_resource_tracker", "_pid"),
    ("loky.backend.resource_tracker", "_resource_tracker", "_pid"),
)


def _pool_pids():
    """PIDs of the processes that live multiprocessing objects of this
    process still hold: each started Process not yet joined that some object
    refers to (the workers of a Pool, a ProcessPoolExecutor, a DataLoader,
    joblib's loky executor; a Process kept in a variable), and the resource
    trackers and forkserver those libraries reuse."""
    pids = _helper_pids()
    process = sys.modules.get("multiprocessing.process")
    if process is not None:
        pids.update(p.pid for p in _referenced_elsewhere(process._children) if p.pid)
    return pids


def _pool_helpers():
    """The resource trackers and forkserver of the modules imported so far."""
    for module_name, holder, attribute in _POOL_HELPERS:
        helper = getattr(sys.modules.get(module_name), holder, None)
        if isinstance(getattr(helper, attribute, None), int):
            yield helper, attribute


def _helper_pids():
    """PIDs of the resource trackers and forkserver: the process's, not any
    one value's or task's (whoever started them, every later user reuses them)."""
    return {getattr(helper, attribute) for helper, attribute in _pool_helpers()}


def _close_trackers():
    """A resource tracker ignores SIGTERM: it exits, unlinking the shared
    memory and semaphores left registered with it, when the last holder of
    its pipe closes it.  Close ours (the process is exiting)."""
    for helper, _ in _pool_helpers():
        fd = getattr(helper, "_fd", None)
        if isinstance(fd, int):   # (the forkserver has none: SIGTERM ends it)
            try:
                os.close(fd)
            except OSError:
                pass
            helper._fd = None


###############################################################################
# Protocol ####################################################################
###############################################################################
#
# The only place the wire format lives (the map at the top shows it).  Lines
# on the worker's private copies of fd 0 and 1: the parent sends task lines,
# CANCEL and SHUT_DOWN; the worker answers with one JSON object per line,
# whose "op" says what it is.

SHUT_DOWN = b"SHUT_DOWN"
CANCEL = b"CANCEL"
OP_TASK, OP_READY, OP_RESULT, OP_CANCELLED, OP_TERMINATED, OP_FATAL, OP_STATS = (
    "task", "ready", "result", "cancelled", "terminated", "fatal", "stats")

# JSON without json.dumps's per-call set-up: a task line per task.
_json_text = json.JSONEncoder().encode
_json_decode = json.JSONDecoder().decode

# A task's "vars" entry, [name, value, nickname]; its JSON texts are made
# once per value (VariableSet.texts) and joined per task.
TASK_VARIABLE = "[%s,%s,%s]"


class _LineBuffer:
    """Turns chunks of bytes into complete lines; keeps the unfinished tail."""

    def __init__(self):
        self._tail = b""

    def feed(self, data):
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()
        return lines

    def close(self):
        """The unterminated last line, if any (the writer died mid-line)."""
        tail, self._tail = self._tail, b""
        return tail


def _encode(op, **fields):
    """One worker -> parent line."""
    message = {"op": op}
    message.update(fields)
    return (_json_text(message) + "\n").encode()


def _encode_task(task, variable_texts, attempt=1):
    """The line that hands ``task`` to a worker; ``variable_texts`` are its
    variables as TASK_VARIABLE texts.  A retry says which attempt it is
    ("attempt", from 2): its log goes on after the attempts before."""
    return ('{"op":"task","id":%s,"folder":%s,"log":%s,%s"vars":[%s]}\n' % (
        _json_text(task.task_id), _json_text(task.folder), _json_text(task.log_file),
        '"attempt":%d,' % attempt if attempt > 1 else "", ",".join(variable_texts))).encode()


def _encode_line(word):
    """A CANCEL or SHUT_DOWN line."""
    return word + b"\n"


def _decode(line):
    """The message of one line (without its newline): a dict with an "op";
    ValueError if the line is not one (a login script's greeting on ssh)."""
    message = _json_decode(line.decode("utf-8"))
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("not a protocol message")
    return message


class _Result:
    """How a task ended, as the worker reports it."""

    __slots__ = ("task_id", "succeeded", "reason", "seconds", "load", "converted",
                 "terminated")

    def __init__(self, task_id, succeeded, reason="", seconds=None, load=0.0, converted=(),
                 terminated=False):
        self.task_id = task_id
        self.succeeded = succeeded
        self.reason = reason        # one line, or "" on success
        self.seconds = seconds      # the worker's clock, loads included
        self.load = load            # seconds of it spent in converters
        self.converted = converted  # the levels (0: the top) whose converters ran
        self.terminated = terminated   # a SIGTERM ended it; the worker exits next

    def __repr__(self):
        return "_Result(%r, %s)" % (self.task_id, "ok" if self.succeeded else self.reason)

    def encode(self):
        fields = {"id": self.task_id, "status": 0 if self.succeeded else 1,
                  "reason": self.reason, "seconds": self.seconds}
        if self.load:
            fields["load"] = self.load
        if self.converted:
            fields["converted"] = list(self.converted)
        if self.terminated:
            fields["terminated"] = True
        return _encode(OP_RESULT, **fields)

    @classmethod
    def decode(cls, message):
        return cls(message.get("id"), message.get("status") == 0, message.get("reason") or "",
                   message.get("seconds"), message.get("load", 0.0),
                   message.get("converted") or (), bool(message.get("terminated")))


###############################################################################
# VariableSet #################################################################
###############################################################################

_JSON_SCALARS = (str, int, float, bool, type(None))
# A variable's folder names and JSON texts (all_tasks.json, task lines) are
# kept in lists when it has at most this many values: those of a small
# variable recur in many tasks; a big one's recur in few (each of a million
# values is in one task), and lists would hold about 150 bytes a value for
# the whole run.  A big variable's are made when a task asks.
CACHE_VALUES = 10000


def _value_text(value):
    """A value as JSON text.  An int's is its repr(), as json writes it, made
    here without the encoder's set-up for a number: 1 us a call, most of the
    cost of a task line for a variable of a million ints."""
    return repr(value) if type(value) is int else _json_text(value)


def _string_text(text):
    """A string as JSON text; one of plain printable ASCII (a number, a
    folder name) needs no escaping and none of the encoder's set-up."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    return _json_text(text)


def _safe_component(name):
    """One safe path component made from a nickname or a value, or None;
    ``name`` itself when it is one already (a million values make no copies)."""
    # isprintable() is False for control characters, DEL and lone surrogates
    # (not UTF-8): the character loop runs only for the rare name that has one.
    if not name.isprintable() or "/" in name or "\\" in name:
        name = "".join("_" if ch in "/\\" or ord(ch) < 32 or ord(ch) == 127
                       or 0xD800 <= ord(ch) <= 0xDFFF else ch
                       for ch in name)
    if name.startswith("-"):
        name = "_" + name[1:]
    if name.strip(".") == "" or len(name.encode("utf-8", "replace")) > 200:
        return None
    return name


class _Variable:
    __slots__ = ("name", "values", "nicknames", "renamed", "folders", "interaction", "rules",
                 "texts", "to_value", "reference")

    def __init__(self, name, values, nicknames, interaction, to_value=None, reference=None):
        self.name = name
        self.to_value = to_value    # add_variable's converter, or None
        self.reference = reference  # where a worker imports it from (_function_reference)
        self.values = values        # JSON scalars, as the task receives them
        # Strings, or None for str(value), made when asked: the str() of a
        # million ints would be 55 MB held for the whole run.
        self.nicknames = nicknames
        self.renamed = {}           # {index: folder} where the folder is not the nickname
        self.folders = None         # every folder name, up to CACHE_VALUES values
        self.interaction = interaction
        self.rules = []             # exceptions: [(depth, value index, allowed indices)]
        self.texts = {}             # JSON text per value, built lazily: see VariableSet.texts

    def nickname(self, index):
        if self.nicknames is None:
            return str(self.values[index])
        return self.nicknames[index]

    def folder(self, index):
        """The value's folder name: a safe path component (see add_variable)."""
        if self.folders is not None:
            return self.folders[index]
        return self.renamed.get(index) or self.nickname(index)

    def all_folders(self):
        return map(self.folder, range(len(self.values)))

    def pairs(self):
        """(value, nickname) of each value, in order."""
        if self.nicknames is None:
            return zip(self.values, map(str, self.values))
        return zip(self.values, self.nicknames)


class VariableSet:
    """The variables to iterate over, highest level of the hierarchy first.

    Tasks are expanded lazily, as tuples of value indices (one per variable),
    so a million-task sweep never holds a million dicts.
    """

    def __init__(self):
        self.variables = []

    def add_variable(self, name, values, nicknames=None, interaction="cartesian",
                     exceptions=None, to_value=None):
        """Add the next (lower) level of the hierarchy.

        values: JSON scalars keep their type; anything else is stored as str().
        nicknames: names for logs and folders (default: the values).
        interaction: "cartesian" (every value under every combination above) or
            "zip" (the i-th value goes with the i-th value of the variable above).
        exceptions: {value or nickname above: [values of this variable]}.
        to_value: the converter, to_value(string_value, nickname), as NAME_to_value
            in variable_iteration.py; workers import it, so it must be a
            module-level function of a module or of the running script.
        """
        where = "variable %r" % (name,)
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError("variable name %r is not a Python identifier; use "
                              "letters, digits and underscores" % (name,))
        if any(v.name == name for v in self.variables):
            raise ConfigError("%s is added twice; each variable name must be unique" % where)
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ConfigError("%s: values must be a list, got %s" % (where, type(values).__name__))
        values = [v if isinstance(v, _JSON_SCALARS) else str(v) for v in values]
        if not values:
            raise ConfigError("%s has no values; give at least one" % where)
        if nicknames is not None:
            nicknames = [str(n) for n in nicknames]
            if len(nicknames) != len(values):
                raise ConfigError("%s has %d values but %d nicknames; give one nickname per "
                                  "value" % (where, len(values), len(nicknames)))
        reference = None
        if to_value is not None:
            # Now, at the line that passed it, rather than when a worker fails to import it.
            reference = _function_reference(to_value, "to_value of variable %r" % name,
                                            _caller_site())
        variable = _Variable(name, values, nicknames, interaction, to_value, reference)
        variable.renamed = self._folder_renames(variable)
        if len(values) <= CACHE_VALUES:
            variable.folders = list(variable.all_folders())
        if interaction not in ("cartesian", "zip"):
            raise ConfigError("%s: interaction=%r; use \"cartesian\" or \"zip\""
                              % (where, interaction))
        if interaction == "zip":
            self._check_zip(variable)
        if exceptions:
            variable.rules = self._exception_rules(variable, exceptions)
        self.variables.append(variable)
        return self

    @staticmethod
    def _folder_renames(variable):
        """{index: folder} of the values whose folder is not their nickname
        as it is; a ConfigError for a nickname that makes no folder, or for
        two values that would share one."""
        where = "variable %r" % variable.name
        values = variable.values
        # Ints named by their value (range(1_000_000)) need no million folder
        # strings: str() is one-to-one on ints and only a "-" changes ("_5").
        # Sorted, equal ones are neighbours (a set of a million would be 34 MB).
        if variable.nicknames is None and all(type(v) is int for v in values) and \
                -10 ** 199 < min(values) and max(values) < 10 ** 200:
            ordered = sorted(values)
            if all(a < b for a, b in zip(ordered, ordered[1:])):
                return {i: "_" + str(-v) for i, v in enumerate(values) if v < 0}
        renamed, seen = {}, set()
        for index, (value, nickname) in enumerate(variable.pairs()):
            folder = _safe_component(nickname)
            if folder is None:
                raise ConfigError("%s: value %r makes no usable folder name from %r; give it "
                                  "a nickname of letters and digits" % (where, value, nickname))
            if folder in seen:
                first = next(v for v, n in variable.pairs() if _safe_component(n) == folder)
                raise ConfigError("%s: values %r and %r would share the folder %r; give them "
                                  "distinct nicknames" % (where, first, value, folder))
            seen.add(folder)
            if folder != nickname:
                renamed[index] = folder
        return renamed

    def _check_zip(self, variable):
        if not self.variables:
            raise ConfigError("variable %r: interaction=\"zip\" needs a variable above it to "
                              "pair with; add that one first" % variable.name)
        above = self.variables[-1]
        if len(above.values) != len(variable.values):
            raise ConfigError("variable %r: interaction=\"zip\" pairs it with %r, but they "
                              "have %d and %d values; give both the same number"
                              % (variable.name, above.name, len(variable.values),
                                 len(above.values)))

    def _exception_rules(self, variable, exceptions):
        where = "variable %r" % variable.name
        if variable.interaction == "zip":
            raise ConfigError("%s: exceptions cannot be combined with interaction=\"zip\""
                              % where)
        if not isinstance(exceptions, dict):
            raise ConfigError("%s: exceptions must be a dict {value above: [values]}" % where)
        rules = []
        for key, listed in exceptions.items():
            matches = [(depth, index)
                       for depth, above in enumerate(self.variables)
                       for index, (value, nickname) in enumerate(above.pairs())
                       if str(key) in (str(value), nickname)]
            if not matches:
                raise ConfigError("%s: exceptions key %r is not a value or nickname of any "
                                  "variable above it" % (where, key))
            if isinstance(listed, (str, bytes)) or not hasattr(listed, "__iter__"):
                listed = [listed]
            allowed = set()
            for item in listed:
                pairs = enumerate(variable.pairs())
                found = [i for i, (value, nickname) in pairs
                         if str(item) in (str(value), nickname)]
                if not found:
                    raise ConfigError("%s: exceptions[%r] lists %r, which is not one of its "
                                      "values %r" % (where, key, item, variable.values))
                allowed.update(found)
            rules.extend((depth, index, frozenset(allowed)) for depth, index in matches)
        return rules

    def __len__(self):
        return sum(1 for _ in self.iter_indices())

    def converters(self):
        """{variable name: the to_value function given to add_variable}."""
        return {v.name: v.to_value for v in self.variables if v.to_value is not None}

    def iter_indices(self):
        """Every task as a tuple of value indices, in hierarchy order."""
        if not self.variables:
            return iter(())
        return self._expand(0, ())

    def _expand(self, depth, prefix):
        variable = self.variables[depth]
        if variable.interaction == "zip":
            choices = (prefix[-1],)
        else:
            choices = range(len(variable.values))
            for rule_depth, rule_index, allowed in variable.rules:
                if prefix[rule_depth] == rule_index:
                    choices = [i for i in choices if i in allowed]
        if depth == len(self.variables) - 1:
            for index in choices:
                yield prefix + (index,)
        else:
            for index in choices:
                yield from self._expand(depth + 1, prefix + (index,))

    def folder_names(self, indices):
        return [v.folders[i] if v.folders is not None else v.folder(i)   # the list: quicker
                for v, i in zip(self.variables, indices)]

    def variables_of(self, indices):
        """{name: value} for a task, as the main-process hooks see it."""
        return {v.name: v.values[i] for v, i in zip(self.variables, indices)}

    def json_fragment(self, indices):
        """The "variables" object of one all_tasks.json entry, from cached pieces."""
        return "{" + ", ".join(self.texts(indices, '%s: {"value": %s, "nickname": %s}')) + "}"

    def texts(self, indices, template):
        """``template`` % (name, value, nickname) as JSON, per variable of a
        task; a variable's list is made once, on first use, unless it has
        more than CACHE_VALUES values (then each text is made when asked)."""
        texts = []
        for variable, index in zip(self.variables, indices):
            per_value = variable.texts.get(template)
            if per_value is None:
                name = _json_text(variable.name)
                if len(variable.values) > CACHE_VALUES:
                    texts.append(template % (name, _value_text(variable.values[index]),
                                             _string_text(variable.nickname(index))))
                    continue
                per_value = variable.texts[template] = [
                    template % (name, _value_text(value), _json_text(nickname))
                    for value, nickname in variable.pairs()]
            texts.append(per_value[index])
        return texts


###############################################################################
# Task ########################################################################
###############################################################################

class Task:
    """One combination of variable values, identified by its folder path."""

    __slots__ = ("task_id", "indices", "folder", "log_file", "started")

    LOG_NAME = "task.log"

    def __init__(self, task_id, indices, folder):
        self.task_id = task_id
        self.indices = indices
        self.folder = folder
        self.log_file = folder + os.sep + self.LOG_NAME
        self.started = None

    def __repr__(self):
        return "Task(%r)" % self.task_id


def _task_id(folders, location):
    """The ID of a task, which is also its folder's path under the output root."""
    return ("/" if location == "VARIABLE_SUBFOLDER" else "_").join(folders)


def _task_of(project, indices):
    task_id = _task_id(project.variable_set.folder_names(indices), project.folder_location)
    return Task(task_id, indices, project.output_dir + os.sep + task_id)


class _Selection:
    """The tasks `run --only NAME=VALUE[,VALUE...] --limit N` runs.

    ``--only`` keeps the tasks whose NAME is one of the VALUEs (values or
    nicknames; several options must all hold).  ``--limit N`` keeps, of
    those not yet succeeded, the first N in task-list order: the order of
    all_tasks.json, which is the hierarchy order the scheduler works
    through.  all_tasks.json still lists every task.  ``takes`` counts as
    the tasks stream past; ``lines`` then says what was selected.

    With --fresh, only the results of the tasks --only selects are
    forgotten (``previous`` set: the IDs of those go to ``forgotten``);
    --limit only says how many of them run now."""

    SHOWN_VALUES = 10   # values listed when one is not found

    def __init__(self, variable_set, only=(), limit=None):
        self.only = list(only or ())
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ThreadwardError("--limit %r: give a whole number of tasks, 1 or more" % (limit,))
        self.limit = limit
        depths = {v.name: depth for depth, v in enumerate(variable_set.variables)}
        allowed = {}
        for option in self.only:
            depth, indices = self._parse(option, variable_set, depths)
            allowed[depth] = allowed[depth] & indices if depth in allowed else indices
        self._allowed = sorted(allowed.items())
        self.seen = self.matched = self.left = 0
        self.previous = None          # successful_tasks.txt's IDs, for --fresh --only
        self.forgotten = set()

    @classmethod
    def _parse(cls, option, variable_set, depths):
        """(depth of the variable, the value indices it allows) for one --only."""
        name, equals, listed = str(option).partition("=")
        name = name.strip()
        if not equals or not name:
            raise ThreadwardError("--only %s: give NAME=VALUE[,VALUE...], e.g. --only %s=%s"
                                  % (option, *cls._example(variable_set)))
        if name not in depths:
            raise ThreadwardError("--only %s: there is no variable %r; the variables are %s"
                                  % (option, name, ", ".join(depths)))
        variable = variable_set.variables[depths[name]]
        matches = cls._matches(variable)
        # A value that itself holds a comma is taken whole.
        texts = [listed] if listed in matches else [text.strip() for text in listed.split(",")]
        indices = set()
        for text in texts:
            if text not in matches:
                raise ThreadwardError("--only %s: %r is not a value or nickname of %s; %s"
                                      % (option, text, name, cls._describe(variable)))
            indices.update(matches[text])
        return depths[name], frozenset(indices)

    @staticmethod
    def _matches(variable):
        """{text: value indices} for every way to name a value: its str(),
        its nickname, and for true/false/null their JSON spelling too."""
        matches = {}
        for index, (value, nickname) in enumerate(variable.pairs()):
            texts = {str(value), nickname}
            if value is None or isinstance(value, bool):
                texts.add(_json_text(value))
            for text in texts:
                matches.setdefault(text, set()).add(index)
        return matches

    @classmethod
    def _describe(cls, variable):
        pairs = list(itertools.islice(variable.pairs(), cls.SHOWN_VALUES))
        shown = ", ".join(str(value) if str(value) == nickname else "%s or %s" % (value, nickname)
                          for value, nickname in pairs)
        more = len(variable.values) - len(pairs)
        return "its values are %s%s" % (shown, ", ... (%d more)" % more if more else "")

    @staticmethod
    def _example(variable_set):
        if not variable_set.variables:
            return "NAME", "VALUE"
        first = variable_set.variables[0]
        return first.name, first.nickname(0)

    def takes(self, indices, done, task_id=None):
        """Whether this run covers the task: it matches every --only, and it
        has succeeded before (``done``: it is skipped, as every rerun skips
        those) or is one of the first --limit still to run."""
        self.seen += 1
        for depth, allowed in self._allowed:
            if indices[depth] not in allowed:
                return False
        self.matched += 1
        if self.previous is not None and task_id in self.previous:
            self.forgotten.add(task_id)
        if done:
            return True
        self.left += 1
        return self.limit is None or self.left <= self.limit

    @property
    def running(self):
        return self.left if self.limit is None else min(self.left, self.limit)

    def lines(self):
        """What was selected, once every task has been through ``takes``.
        Raises ThreadwardError if --only leaves no task."""
        lines = []
        if self.only:
            given = " ".join("--only %s" % option for option in self.only)
            if not self.matched:
                raise ThreadwardError("%s: no task has all of these (each exists, but not in "
                                      "one task together); nothing was run" % given)
            lines.append("%s: %d of %s selected" % (given, self.matched,
                                                    _plural(self.seen, "task")))
        if self.limit is not None:
            lines.append("--limit %d: %s" % (self.limit, (
                "the first %d of the %d tasks to run (in task-list order)"
                % (self.limit, self.left) if self.left > self.limit else
                "all %s to run" % _plural(self.left, "task"))))
        return lines


def _write_task_list(project, succeeded, scheduler, selection=None):
    """Expand the variables into task_queue/all_tasks.json, streamed and
    written whole or not at all, checking every task ID; the tasks not in
    ``succeeded`` (and taken by ``selection``, if any) go into
    ``scheduler``.  Returns how many were skipped."""
    path = os.path.join(project.queue_dir, "all_tasks.json")
    temporary = "%s.tmp%d" % (path, os.getpid())
    _remove_stale_temporaries(project.queue_dir)   # ours alone: we hold the lock
    try:
        with open(temporary, "w", buffering=1 << 20) as stream:
            skipped = _stream_tasks(project, stream, succeeded, scheduler, selection)
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError):   # a full disk, a quota, `ulimit -f`
            raise ThreadwardError("cannot write %s: %s; nothing was run (free space, then "
                                  "run again)" % (_display_path(path), exc.strerror or exc))
        raise
    return skipped


def _fill_queue(project, ledger, fresh, selection):
    """Expand, check IDs, stream all_tasks.json: the scheduler of the tasks
    to run (``ledger`` counts them and those skipped), and what to say of
    the selection."""
    if _case_insensitive(project.queue_dir):
        _check_case_collisions(project.variable_set, project.variables_where())
    if fresh and selection is not None and selection.only:
        # --fresh --only: the other tasks' results are kept.
        selection.previous = ledger.read_succeeded()
    succeeded = set() if fresh else ledger.read_succeeded()
    scheduler = _Scheduler(len(project.variable_set.variables))
    ledger.skipped = _write_task_list(project, succeeded, scheduler, selection)
    ledger.total = len(scheduler)
    if selection is None:
        return scheduler, []
    if selection.previous is not None:
        ledger.forget(selection.forgotten)
    return scheduler, selection.lines()


def _stream_tasks(project, stream, succeeded, scheduler, selection=None):
    variable_set = project.variable_set
    location = project.folder_location
    where = project.variables_where()
    output_root = os.path.relpath(project.output_dir, project.directory)
    # One variable's IDs are its folders, distinct already (add_variable).
    check_ids = location == "VARIABLE_UNDERSCORE" and len(variable_set.variables) > 1 \
        and any("_" in folder for v in variable_set.variables for folder in v.all_folders())
    seen_ids, skipped = set(), 0
    stream.write("[")
    separator = "\n"
    for indices in variable_set.iter_indices():
        task_id = _task_id(variable_set.folder_names(indices), location)
        if check_ids:
            if task_id in seen_ids:
                raise ConfigError(
                    "two tasks would share the ID and folder %r (folder names joined with "
                    "\"_\" collide); use TASK_FOLDER_LOCATION = \"VARIABLE_SUBFOLDER\" or "
                    "nicknames without \"_\"" % task_id, where)
            seen_ids.add(task_id)
        if location == "VARIABLE_UNDERSCORE" and len(task_id.encode()) > 255:
            raise ConfigError(
                "the folder name %r is longer than a filesystem allows (255 bytes); use "
                "shorter nicknames or TASK_FOLDER_LOCATION = \"VARIABLE_SUBFOLDER\""
                % task_id, where)
        stream.write('%s{"task_id": %s, "task_folder": %s, "variables": %s}' % (
            separator, _string_text(task_id), _string_text(output_root + "/" + task_id),
            variable_set.json_fragment(indices)))
        separator = ",\n"
        if selection is not None and not selection.takes(indices, task_id in succeeded, task_id):
            continue
        if task_id in succeeded:
            skipped += 1
        else:
            scheduler.add(indices)
    stream.write("\n]\n")
    return skipped


###############################################################################
# Scheduler ###################################################################
###############################################################################
#
# Where a worker's next task comes from, and whether it should wait instead.
#
# The tree (_Scheduler) holds the remaining tasks as a prefix tree with
# counts and decides *where*: a freed worker gets the remaining task that
# keeps the longest prefix of its previous one (its model stays loaded).
# When its branch is exhausted it goes where no other worker is (the first
# such branch in order); only when every branch is busy does it split the one
# with the most work left per worker, taking from the far end so the owner
# keeps its order, and the two meet in the middle.
#
# The join policy (_JoinPolicy) decides *whether* a worker may split a busy
# branch, which costs a load:
#
# * The join limit.  Each prefix is loaded once when first entered, and each
#   join loads it once more: at most W - 1 joins per level keep a level of P
#   prefixes within P + W - 1 loads, what cutting the sweep into W contiguous
#   runs would take.  That plan fits tasks of equal length; when task times
#   vary the last tasks of a branch can run long, and joining is how the
#   sweep catches up, so the allowance grows with the measured spread of
#   task times (W x the coefficient of variation).
# * The cost.  A join pays when the joiner would finish the far-end task (its
#   load, then one task) before the branch's own workers would finish the
#   branch; while the load or the branch's task time is unmeasured, it joins
#   (waiting wrongly can cost far more than one load).
# * The hang rescue.  Past the limit, a worker may still join a branch whose
#   running task looks stuck (OVERDUE_FACTOR times its expected time) while
#   nothing outside it runs as expected: a hung task must not keep the others
#   off its branch for good, a slow one must not draw them in.
#
# A worker told to wait asks again WAIT_RECHECK later (hand_out).  Of several
# workers freed at once, the one with the most of its branch left asks first,
# again after each ask: a branch's own workers are back in it before another
# could find it free and join it unchecked.  The main loop, bench B4 and the
# tests all hand out tasks through hand_out.
#
# Every step is O(depth x branching) (plus, when a worker's branch ends and
# every other is busy, a look at the tasks held), never a scan of the queue.

class _Stat:
    """A running total, count and largest value."""

    __slots__ = ("total", "count", "largest")

    def __init__(self):
        self.total, self.count, self.largest = 0.0, 0, 0.0

    def add(self, value):
        self.total += value
        self.count += 1
        if value > self.largest:
            self.largest = value

    def mean(self, default=None):
        return self.total / self.count if self.count else default


class _Node:
    __slots__ = ("children", "remaining", "active", "entered", "measured")

    def __init__(self, leaf_level):
        # Above the last variable: {value index: _Node}, insertion-ordered.
        # At the last variable: a deque of value indices.
        self.children = collections.deque() if leaf_level else {}
        self.remaining = 0
        self.active = 0          # tasks held by workers (running or queued) in this subtree
        self.entered = False     # a worker has been given a task in it (so loaded it)
        self.measured = _Stat()  # seconds of its tasks that ran to their end, loads excluded

    def task_seconds(self, default=None):
        """The mean task time measured in this subtree (loads excluded)."""
        return self.measured.mean(default)


class _Held:
    """A task a worker holds: running, or queued behind its running one."""

    __slots__ = ("task", "nodes", "left_at", "since", "joins", "firsts")

    def __init__(self, task, nodes, left_at, since, joins, firsts):
        self.task = task          # its value indices
        self.nodes = nodes        # the root and the nodes on its path
        self.left_at = left_at    # the level it left the worker's previous prefix at
        self.since = since        # when it was given; when it started, for the oldest
        self.joins = joins        # levels at which taking it was a join
        self.firsts = firsts      # nodes it was the first to enter


def _seconds_per_worker(node, default):
    """The branch's work left per worker if one more joined (its own mean
    task time where it has one)."""
    return node.remaining * node.task_seconds(default) / (node.active + 1)


class _JoinPolicy:
    """Whether a worker may join a busy branch (see the section's notes).
    Bench B4 and the tests compare it with what each rule is for: without
    the ``limit`` it joins whenever the load pays; without ``weigh``,
    whenever the limit lets it; without ``spread`` the limit stays W - 1
    whatever the task times; without ``rescue`` no stuck task draws a
    worker past the limit."""

    def __init__(self, limit=True, weigh=True, spread=True, rescue=True):
        self.limit, self.weigh, self.use_spread, self.rescues = limit, weigh, spread, rescue
        self.tree = None
        self.joins = []          # per level: entries into a branch already entered
        self.workers = set()     # every worker that asked: the W of P + W - 1
        self.spread = _Stat()    # squared relative differences of task times
        self.steady = {}         # key -> its last task's seconds, if it kept its prefix
        self.loads = {}          # level a move left the previous prefix at -> _Stat of loads

    def attach(self, tree):
        self.tree = tree
        self.joins = [0] * tree.depth

    def may_join(self, level):
        """Whether one more worker may join a busy branch at ``level``."""
        if not self.limit:
            return True
        workers = len(self.workers)
        slack = int(workers * self.spread.mean(0.0) ** 0.5) if self.use_spread else 0
        return self.joins[level] < workers - 1 + slack

    def joined(self, levels, by=1):
        for level in levels:
            self.joins[level] += by

    def rescue(self, node, level):
        """Indices of the children of ``node`` (at ``level``) that a worker
        may join past the limit: one whose running task looks hung (any,
        while no task has been measured) while no task outside it is
        running as expected."""
        if not self.rescues:
            return set()
        tree = self.tree
        now, late, running = tree.clock(), set(), set()
        for held in tree.held.values():
            for position, item in enumerate(held):
                nodes = item.nodes
                under = item.task[level] if len(nodes) > level + 1 and \
                    nodes[level] is node else None
                if position == 0 and (not tree.root.measured.count
                                      or self._overdue(item, now)):
                    if under is not None:
                        late.add(under)
                else:
                    running.add(under)
        return {index for index in late if running <= {index}}

    def _overdue(self, item, now):
        """Whether the running task ``item`` has run OVERDUE_FACTOR times as
        long as expected: the longest task measured on its path; or, if it
        loads, LOAD_OVERDUE_FACTOR times the longest load measured plus the
        longest task of the sweep (one prefix's load says little of
        another's, and a load inside task_method counts as task time).
        Never while nothing is measured."""
        tree = self.tree
        if item.left_at < tree.depth - 1:
            loads = max((stat.largest for stat in self.loads.values()), default=0.0)
            expected = LOAD_OVERDUE_FACTOR * loads + tree.root.measured.largest
        else:
            expected = next((node.measured.largest for node in reversed(item.nodes)
                             if node.measured.largest), 0.0)
        return bool(tree.root.measured.largest) and now - item.since > OVERDUE_FACTOR * expected

    def load_seconds(self, level):
        """The mean load of a move that leaves the previous prefix at
        ``level``; None before one was measured."""
        stat = self.loads.get(level)
        return stat.mean() if stat else None

    def _running_time_left(self, node, level):
        """{child index: the time its held tasks have left} for the children
        of ``node`` at ``level``, from means; an overdue task is guessed to
        need as long again as it has run past its expected end (durations are
        often heavy-tailed, and a stuck task must not keep others waiting)."""
        now, left = self.tree.clock(), {}
        for held in self.tree.held.values():
            for item in held:
                nodes = item.nodes
                if len(nodes) > level + 1 and nodes[level] is node:
                    work = nodes[level + 1].task_seconds(0.0)
                    end = item.since + (self.load_seconds(item.left_at) or 0.0) + work
                    index = item.task[level]
                    left[index] = left.get(index, 0.0) + (
                        end - now if end > now else max(work, now - end))
        return left

    def worth_joining(self, node, busy, level, loading_from):
        """The first of the busy children ``busy`` of ``node`` (at ``level``)
        that a worker loading from ``loading_from`` down should join, or None:
        only if it would finish the far-end task (its load, then one task)
        before the branch's own workers would finish the branch (their time
        left, the tasks not started, and the loads of the sub-branches no one
        holds yet, shared among them).  While the branch's task time or the
        load is unmeasured, it joins."""
        if not self.weigh:
            return busy[0]
        load = self.load_seconds(loading_from)
        running = self._running_time_left(node, level)
        for index in busy:
            child = node.children[index]
            work = child.task_seconds()
            if not load or work is None:
                return index
            left = running.get(index, 0.0) + child.remaining * work
            if isinstance(child.children, dict):
                untouched = sum(1 for grandchild in child.children.values()
                                if grandchild.remaining and not grandchild.active)
                left += untouched * (self.load_seconds(loading_from + 1) or 0.0)
            if load + work < left / child.active:
                return index
        return None

    def learn(self, key, item, work, load):
        """A task held by ``key`` ran to its end: ``work`` seconds of task,
        ``load`` of converting."""
        self._note_spread(key, work if item.left_at == self.tree.depth - 1 else None)
        self.loads.setdefault(item.left_at, _Stat()).add(load)

    def _note_spread(self, key, work):
        """What the limit reads the spread of task times from: the difference
        of two tasks in a row by one worker with the same prefix, relative to
        their mean (for independent times, half its square is the squared
        coefficient of variation on average).  ``work`` is None after a move:
        the first task of a prefix may carry one-off costs, and tasks under
        another prefix may differ for a reason."""
        previous = self.steady.get(key)
        if work is None:
            self.steady.pop(key, None)
            return
        self.steady[key] = work
        if previous is not None and previous + work > 0:
            self.spread.add(2 * ((work - previous) / (previous + work)) ** 2)

    def forget(self, key):
        self.steady.pop(key, None)


class _Scheduler:
    """The remaining tasks as a prefix tree with counts; no processes in it.
    ``policy`` (a _JoinPolicy) decides whether a worker may join a busy
    branch; the tree decides where."""

    def __init__(self, depth, clock=time.monotonic, policy=None):
        self.depth = depth
        self.root = _Node(depth == 1)
        self.clock = clock
        self.policy = policy or _JoinPolicy()
        self.policy.attach(self)
        self.held = {}       # key -> [_Held], oldest (the running one) first
        self._last = {}      # key -> indices of its previous task
        self._before = {}    # key -> the one before that (see put_back)
        self._reverse = {}   # key -> True while it works from the far end of a shared branch
        self._waiting = {}   # key -> when a worker told to wait asks again

    def __len__(self):
        return self.root.remaining

    def add(self, indices):
        node = self.root
        node.remaining += 1
        for level, index in enumerate(indices[:-1]):
            child = node.children.get(index)
            if child is None:
                child = node.children[index] = _Node(level + 2 == self.depth)
            child.remaining += 1
            node = child
        node.children.append(indices[-1])

    # -- handing out --------------------------------------------------------

    def hand_out(self, free, holding):
        """Ask for a task for each of the free workers ``free`` (keys), in
        the asking order; yields (key, indices), indices None when none is
        left or none is worth the worker's load now (it is told to wait, and
        asks again WAIT_RECHECK later, at the earliest).  ``holding``: some
        worker holds a task, so an event is sure to come and a worker may
        wait; a task given in this round counts too."""
        now = self.clock()
        answered = [key for key in free if key not in self._waiting]
        while answered:   # decided again after each ask: a task given may end a branch
            key = max(answered, key=self.kept)
            answered.remove(key)
            indices = self._ask(key, holding, now)
            holding = holding or indices is not None
            yield key, indices
        for key in free:
            if key in self._waiting and (now >= self._waiting[key] or not len(self)):
                indices = self._ask(key, holding, now)
                holding = holding or indices is not None
                yield key, indices

    def _ask(self, key, patient, now):
        indices = self.assign(key, patient=patient)
        if indices is None and len(self):
            self._waiting[key] = now + WAIT_RECHECK
        else:
            self._waiting.pop(key, None)
        return indices

    def is_waiting(self, key):
        """Whether worker ``key`` was told that no task is worth its load."""
        return key in self._waiting

    def assign(self, key, ahead=False, patient=True):
        """Indices of the next task for worker ``key``, or None when none
        remain or (``patient``) none is worth its load now.  ``ahead``: the
        worker is still running its previous task (this one is queued behind
        it), which stays counted where it is."""
        self.policy.workers.add(key)
        if not ahead:
            while key in self.held:
                self.release(key)
        if not self.root.remaining:
            return None
        last = self._last.get(key, ())
        reverse = self._reverse.get(key, False)
        nodes = self._kept_nodes(last)                # keep the longest prefix
        path, node = list(last[:len(nodes) - 1]), nodes[-1]
        kept = len(path)
        joins = []
        while len(path) < self.depth - 1:             # choose below it
            chosen = self._choose(node, reverse, not path, len(path),
                                  kept if len(path) == kept and patient else None, patient)
            if chosen is None:
                return None
            index, child, reverse = chosen
            if child.entered:
                joins.append(len(path))
            node = child
            path.append(index)
            nodes.append(node)
        leaves = node.children
        path.append(leaves.pop() if reverse else leaves.popleft())
        firsts = [member for member in nodes if not member.entered]
        for member in nodes:
            member.remaining -= 1
            member.active += 1
            member.entered = True
        self.policy.joined(joins)
        task = tuple(path)
        self._before[key] = last
        self._last[key] = task
        self._reverse[key] = reverse
        self.held.setdefault(key, []).append(
            _Held(task, nodes, kept, self.clock(), joins, firsts))
        return task

    def _kept_nodes(self, last):
        """The root and the nodes of the longest prefix of the task ``last``
        that still have tasks left."""
        nodes = [self.root]
        for index in last[:-1]:
            child = nodes[-1].children.get(index)
            if child is None or not child.remaining:
                break
            nodes.append(child)
        return nodes

    def kept(self, key):
        """How many levels of worker ``key``'s previous task still have tasks left."""
        return len(self._kept_nodes(self._last.get(key, ()))) - 1

    def _choose(self, node, reverse, at_root, level, loading_from, patient):
        """(index, child, reverse) of the branch of ``node`` (at ``level``) to
        go into: the first with no worker (the last, working from the far
        end); else a busy one, the most work per worker first, from its far
        end.  ``patient``: past the join limit, only a busy branch whose task
        looks stuck.  With ``loading_from`` (the level the worker must load
        from to get there), only a busy branch worth that load.  None if
        there is none."""
        children = node.children
        order = reversed(children) if reverse and not at_root else children
        for index in order:
            child = children[index]
            if not child.active:
                return index, child, reverse and not at_root
        overall = self.root.task_seconds(UNMEASURED_TASK_SECONDS)
        # A branch whose last tasks are running stays until they end: not into it.
        busy = [i for i in children if children[i].remaining]
        if patient and not self.policy.may_join(level):
            rescue = self.policy.rescue(node, level)
            busy = [i for i in busy if i in rescue]
            if not busy:
                return None
        busy.sort(key=lambda i: _seconds_per_worker(children[i], overall), reverse=True)
        if loading_from is None:
            index = busy[0]
        else:
            index = self.policy.worth_joining(node, busy, level, loading_from)
            if index is None:
                return None
        return index, children[index], True

    # -- giving back --------------------------------------------------------

    def release(self, key, newest=False, seconds=None, load=0.0):
        """The (oldest) task of worker ``key`` has ended (succeeded, failed or
        died).  ``seconds``: how long it took, ``load`` of which went to
        converting changed values.  Returns its _Held, or None."""
        held = self.held.get(key)
        if not held:
            return None
        item = held.pop(-1 if newest else 0)
        if held and not newest:   # the task queued behind it starts now
            held[0].since = self.clock()
        work = None if seconds is None else max(0.0, seconds - load)
        for node in item.nodes:
            node.active -= 1
            if work is not None:
                node.measured.add(work)
        if work is not None:
            self.policy.learn(key, item, work, load)
        # A branch goes when its last task is done, not when its last task is
        # handed out: a task put back finds it with its workers still counted.
        nodes, task = item.nodes, item.task
        for depth in range(len(nodes) - 1, 0, -1):
            node, parent = nodes[depth], nodes[depth - 1]
            if node.active or node.remaining or parent.children.get(task[depth - 1]) is not node:
                break
            del parent.children[task[depth - 1]]
        if not held:
            del self.held[key]
        return item

    def put_back(self, key, indices, started=False):
        """The one way a task given to worker ``key`` comes back, to be
        handed out again.  Not ``started`` (queued, cancelled, or its worker
        gone before it began): the newest the worker holds; the worker holds
        what its task before that left it, and a join made to get it is
        undone (nothing was loaded).  ``started`` (a signal meant for the task
        before it ended this one): the oldest, learning nothing from it."""
        if started:
            self.release(key)
        else:
            item = self.release(key, newest=True)
            if item is not None:
                self.policy.joined(item.joins, by=-1)
                for node in item.firsts:
                    node.entered = bool(node.active)
            if self._last.get(key) == tuple(indices):
                self._last[key] = self._before.pop(key, ())
        self.add(indices)

    def forget(self, key):
        """Worker ``key`` is gone: what it held is released unmeasured."""
        while key in self.held:
            self.release(key)
        for table in (self._last, self._before, self._reverse, self._waiting):
            table.pop(key, None)
        self.policy.forget(key)


###############################################################################
# Project files and settings ##################################################
###############################################################################

def _case_insensitive(directory):
    """Whether the filesystem holding ``directory`` ignores case (macOS, some mounts)."""
    probe = os.path.join(directory, ".threadward-Case-Probe-%d" % os.getpid())
    open(probe, "w").close()
    try:
        return os.path.exists(probe.lower())
    finally:
        os.unlink(probe)


def _check_case_collisions(variable_set, where):
    for variable in variable_set.variables:
        seen = {}
        for folder in variable.all_folders():
            other = seen.setdefault(folder.lower(), folder)
            if other != folder:
                raise ConfigError(
                    "variable %r: folders %r and %r differ only in case, and this filesystem "
                    "ignores case, so two tasks would share a folder; give them distinct "
                    "nicknames" % (variable.name, other, folder), where)


def _load_user_module(path, name):
    """Import a project file; any failure is a ConfigError at the user's line."""
    if not os.path.isfile(path):
        raise ConfigError("%s is missing; run `threadward init` to create it"
                          % _display_path(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ConfigError("syntax error: %s" % exc.msg,
                          "%s:%s" % (_display_path(path), exc.lineno))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ConfigError("importing it raised %s: %s" % (type(exc).__name__, exc),
                          _user_frame(exc.__traceback__, path) or _display_path(path))
    sys.modules[name] = module
    return module


def _setting_line(path, name):
    """'file:line' where the module-level setting ``name`` is assigned (for
    a sweep from code, ``path`` is its _CallSite: the keyword there)."""
    if isinstance(path, _CallSite):
        return path.keyword(name)
    import ast
    try:
        with open(path) as stream:
            tree = ast.parse(stream.read())
    except (OSError, SyntaxError, ValueError):
        return _display_path(path)
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return "%s:%d" % (_display_path(path), node.lineno)
    return _display_path(path)


def _assigned_names(path):
    """[(name, line)] of the module-level assignments of a project file."""
    import ast
    try:
        with open(path) as stream:
            tree = ast.parse(stream.read())
    except (OSError, SyntaxError, ValueError):
        return []
    found = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        found.extend((t.id, node.lineno) for t in targets if isinstance(t, ast.Name))
    return found


def _slip(name, setting):
    """How ``name`` is one slip off ``setting``: "missing" (a letter left
    out), "swapped" (two neighbours), "other" (one letter more or changed),
    or None."""
    if len(name) == len(setting) - 1:
        return "missing" if any(setting[:i] + setting[i + 1:] == name
                                for i in range(len(setting))) else None
    if len(name) == len(setting) + 1:
        return "other" if any(name[:i] + name[i + 1:] == setting
                              for i in range(len(name))) else None
    if len(name) != len(setting) or name == setting:
        return None
    differ = [i for i in range(len(name)) if name[i] != setting[i]]
    if len(differ) == 2 and differ[1] == differ[0] + 1 and \
            name[differ[0]] == setting[differ[1]] and name[differ[1]] == setting[differ[0]]:
        return "swapped"
    return "other" if len(differ) == 1 else None


def _check_setting_names(path):
    """A known setting in the wrong file, or a misspelled one, would be
    ignored without a word; the user's own constants (DATA_DIR) are fine.
    A name a word off a setting (TIMEOUT, RETRY) may be either: a note
    each (returned), not an error."""
    filename = os.path.basename(path)
    assigned = _assigned_names(path)
    present = {name for name, _ in assigned}
    notes = []
    for name, line in assigned:
        if not name.isupper() or name.startswith("_") or name in SETTINGS[filename]:
            continue
        where = "%s:%d" % (_display_path(path), line)
        for other, names in SETTINGS.items():
            if name in names:
                raise ConfigError("%s is a setting of %s, not of %s: move it there (here it "
                                  "would be ignored)" % (name, other, filename), where)
        for other, names in SETTINGS.items():
            for setting in names:
                slip = _slip(name, setting)
                # A letter more or changed next to the real setting is more
                # likely a constant of the user's (OUTPUT_MODEL, GPUS_PER_WORKER).
                if slip and (slip != "other" or setting not in present):
                    raise ConfigError("%s is not a setting; did you mean %s?%s" % (
                        name, setting, "" if other == filename else " (it belongs in %s)"
                        % other), where)
        near = ["%s%s" % (setting, "" if other == filename else ", in " + other)
                for other, names in SETTINGS.items() for setting in names
                if _a_word_off(name, setting, setting in present)]
        if near:
            notes.append("note: %s: %s is not a setting and does nothing; did you mean %s? "
                         "(if %s is your own constant, ignore this)" % (
                             where, name, " or ".join(near), name))
    return notes


def _a_word_off(name, setting, setting_too):
    """RETRY or RETRYS for RETRIES; TIMEOUT for TASK_TIMEOUT (a word left
    out) unless the setting is assigned too (``setting_too``: then OUTPUT
    beside OUTPUT_MODE is a constant of the user's).  A word more
    (MAX_RETRIES, NUM_WORKERS_DATALOADER) is taken for the user's own."""
    def stem(word):
        return word.rstrip("S").replace("IE", "Y")
    if stem(name) == stem(setting):
        return True
    return not setting_too and (setting.startswith(name + "_") or setting.endswith("_" + name))


def _check_hooks(module, path, names):
    for name in names:
        if getattr(module, name, None) is not None and not callable(getattr(module, name)):
            raise ConfigError("%s is defined but is not a function; define it with `def %s(...)`"
                              " or remove it" % (name, name), _setting_line(path, name))


def _choice_setting(module, path, name, allowed):
    value = getattr(module, name, allowed[0])
    if value not in allowed:
        raise ConfigError("%s = %r is not a known setting; use one of: %s"
                          % (name, value, ", ".join(allowed)), _setting_line(path, name))
    return value


def _number_setting(module, path, name, default, minimum, integer=False, allow_none=False):
    value = getattr(module, name, default)
    if value is None and allow_none:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value != value or \
            value < minimum:   # value != value: nan
        raise ConfigError("%s = %r; it must be %s >= %s%s"
                          % (name, value, "a whole number" if integer else "a number",
                             minimum, " (or None)" if allow_none else ""),
                          _setting_line(path, name))
    return value


def _string_list_setting(module, path, name):
    value = getattr(module, name, None)
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
            isinstance(item, str) for item in value):
        raise ConfigError("%s = %r; give a list of strings" % (name, value),
                          _setting_line(path, name))
    return list(value)


def _gpu_list_setting(module, path, name):
    value = getattr(module, name, None)
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple, set)) or any(
            isinstance(g, bool) or not isinstance(g, (str, int)) for g in value):
        raise ConfigError("%s = %r; give a list of GPU numbers as nvidia-smi shows them, "
                          "like [\"0\", \"3\"]" % (name, value), _setting_line(path, name))
    return [str(g).strip() for g in value]


def _flag_setting(module, path, name):
    value = getattr(module, name, False)
    if not isinstance(value, bool):
        raise ConfigError("%s = %r; use True or False" % (name, value), _setting_line(path, name))
    return value


def _gpus_per_worker(module, path):
    value = _number_setting(module, path, "NUM_GPUS_PER_WORKER", 0, 0)
    if value >= 1 and value != int(value):
        raise ConfigError("NUM_GPUS_PER_WORKER = %r; use a whole number of GPUs, or 1/k to "
                          "share one GPU among k workers" % value,
                          _setting_line(path, "NUM_GPUS_PER_WORKER"))
    if 0 < value < 1:
        share = round(1 / value)
        if abs(share * value - 1) > 1e-6:
            raise ConfigError("NUM_GPUS_PER_WORKER = %r is not 1/k; use 1/2, 1/3, 1/4, ... "
                              "(k workers per GPU)" % value,
                              _setting_line(path, "NUM_GPUS_PER_WORKER"))
        return 1, share
    return int(value), 1


class _Project:
    """The three project files of DIR/threadward, loaded and checked; or a
    sweep declared in code (``sweep``, a _Sweep), for which no file is read.

    ``load`` (the main process) and ``load_for_worker`` import the modules
    (or, for a sweep, make stand-ins of them from its keywords), then
    ``_read_settings`` sets every setting at once, from the files that were
    loaded (a worker does not read resource_constraints.py: its settings
    keep their defaults there), so that both have the same fields."""

    def __init__(self, directory, sweep=None):
        self.directory = os.path.abspath(directory)
        self.config_dir = os.path.join(self.directory, PROJECT_SUBDIR)
        self.queue_dir = os.path.join(self.config_dir, "task_queue")
        self.output_dir = os.path.join(self.config_dir, "task_outputs")
        self.worker_log_dir = os.path.join(self.config_dir, "worker_logs")
        self.status_file = os.path.join(self.queue_dir, "status.json")
        self.spec_file = os.path.join(self.queue_dir, SWEEP_FILE)
        self.sweep = sweep
        # A sweep's settings have no file: their errors name the keyword at its call.
        self.call_site = sweep.call_site if sweep is not None else None
        self.workers_read_spec = False   # sweep.json was written: workers import from it
        self.imported_converters = {}    # (a worker) the to_value functions of sweep.json
        self.notes = []                  # what load() saw that is likely a slip, not an error

    def path(self, filename):
        return os.path.join(self.config_dir, filename)

    def check_folder(self):
        """Before reading a project's files (`results`, `report`): it has one."""
        if not os.path.isdir(self.directory):
            raise ThreadwardError("%s does not exist; give the project directory (the one "
                                  "holding threadward/)" % _display_path(self.directory))
        if not os.path.isdir(self.config_dir):
            raise ThreadwardError("%s has no threadward/ folder; give the project directory "
                                  "(the one holding threadward/)" % _display_path(self.directory))

    def _source(self, filename):
        """Where the settings of ``filename`` come from, for their errors."""
        return self.call_site or self.path(filename)

    def variables_where(self):
        """Where the variables were declared, for errors about their tasks."""
        return str(self.call_site or _display_path(self.path("variable_iteration.py")))

    def load_task_module(self):
        """task_specification.py; also what a worker needs."""
        if not os.path.isdir(self.config_dir):
            raise ConfigError("%s has no threadward/ folder; run `threadward init %s` first"
                              % (self.directory, _display_path(self.directory)))
        path = self.path("task_specification.py")
        module = _load_user_module(path, "task_specification")
        if not callable(getattr(module, "task_method", None)):
            raise ConfigError("task_method(variables, task_folder, log_file) is not defined; "
                              "it is the one function every project must have",
                              _display_path(path))
        _check_hooks(module, path, MAIN_HOOKS + WORKER_HOOKS + TASK_HOOKS)
        self.task_module = module
        return module

    def load_variable_module(self):
        path = self.path("variable_iteration.py")
        module = _load_user_module(path, "variable_iteration")
        if not callable(getattr(module, "setup_variable_set", None)):
            raise ConfigError("setup_variable_set(variable_set) is not defined; it declares "
                              "the variables to iterate over", _display_path(path))
        _check_hooks(module, path, RESULT_HOOKS)
        self.variable_module = module
        return module

    def load(self):
        """Load and check everything `run` needs; ConfigError on any mistake."""
        if self.sweep is not None:
            self.task_module, self.variable_module, constraints = self.sweep.modules()
            self._read_settings(constraints)
            self.variable_set = self.sweep.variables
            return
        # Each file's values are checked as it is loaded: of two mistakes,
        # the one in the earlier file is reported.
        self.load_task_module()
        self._read_task_settings()
        self.load_variable_module()
        self._read_variable_settings()
        constraints = _load_user_module(self.path("resource_constraints.py"),
                                        "resource_constraints")
        for filename in CONFIG_FILES:
            self.notes += _check_setting_names(self.path(filename))
        self._read_resource_settings(constraints)
        self.variable_set = self._build_variable_set()
        self.notes += self._unused_converters()

    def _unused_converters(self):
        """NAME_to_value functions of no variable (a misspelled name): never called."""
        names = [variable.name for variable in self.variable_set.variables]
        notes = []
        for name, function in sorted(self.converters().items()):
            code = getattr(function, "__code__", None)
            if name in names or code is None:
                continue
            notes.append("note: %s:%d: %s_to_value converts nothing: no variable is called "
                         "%r (the variables: %s)" % (
                             _display_path(self.path("variable_iteration.py")),
                             code.co_firstlineno, name, name, ", ".join(names)))
        return notes

    def load_for_worker(self, read_spec=False):
        """What a worker needs: the task and variable files, or (``read_spec``)
        what task_queue/sweep.json says to import instead or as well."""
        spec = _read_json(self.spec_file) if read_spec else {}
        if spec.get("functions"):   # a sweep from code
            self.call_site = _CallSite(spec["where"])
            self.task_module, self.variable_module = _import_sweep(spec)
        else:
            self.load_task_module()
            self.load_variable_module()
        self.imported_converters = {
            name: _import_reference(reference, "to_value of variable %r" % name)
            for name, reference in spec.get("converters", {}).items()}
        self._read_settings(types.SimpleNamespace())

    def worker_spec(self):
        """What workers must import, as sweep.json holds it; None where the
        project files are all they need."""
        converters = {variable.name: variable.reference
                      for variable in self.variable_set.variables if variable.reference}
        if self.sweep is None:
            return {"converters": converters} if converters else None
        return dict(self.sweep.worker_spec(), converters=converters)

    def ignored_files_note(self):
        """A sweep from code in a folder that holds project files reads none of them."""
        found = [name for name in CONFIG_FILES if os.path.exists(self.path(name))]
        if self.sweep is None or not found:
            return None
        return "note: a sweep from code reads none of the project files; %s in %s %s ignored" % (
            ", ".join(found), _display_path(self.config_dir), "is" if len(found) == 1 else "are")

    def settings_record(self):
        """{NAME: value} of every setting, as the run's events record it
        (JSON: lists for tuples, "inf" for an endless SIGTERM_GRACE)."""
        record = {}
        for names in SETTINGS.values():
            for name in names:
                if name == "NUM_GPUS_PER_WORKER":
                    value = self.gpus_per_worker if self.workers_per_gpu == 1 else \
                        "1/%d" % self.workers_per_gpu
                elif name == "TASK_FOLDER_LOCATION":
                    value = self.folder_location
                else:
                    value = getattr(self, name.lower())
                record[name] = _json_plain(value)
        return record

    def write_worker_spec(self):
        """task_queue/sweep.json for the workers about to start (or no such
        file, where they need none: one left by an earlier run must not count)."""
        spec = self.worker_spec()
        self.workers_read_spec = spec is not None
        if spec is not None:
            _atomic_write(self.spec_file, json.dumps(spec, indent=1) + "\n")
        elif os.path.exists(self.spec_file):
            os.unlink(self.spec_file)

    def _read_settings(self, constraints):
        """Every setting, checked (ConfigError with file:line for a bad value)."""
        self._read_task_settings()
        self._read_variable_settings()
        self._read_resource_settings(constraints)

    def _read_task_settings(self):
        module, path = self.task_module, self._source("task_specification.py")
        self.success_condition = _choice_setting(module, path, "SUCCESS_CONDITION",
                                                 SUCCESS_CONDITIONS)
        self.output_mode = _choice_setting(module, path, "OUTPUT_MODE", OUTPUT_MODES)
        self.sigterm_grace = _number_setting(module, path, "SIGTERM_GRACE", SIGTERM_GRACE, 0)
        self.task_timeout = _number_setting(module, path, "TASK_TIMEOUT", None, 0.001,
                                            allow_none=True)
        self.retries = _number_setting(module, path, "RETRIES", 0, 0, integer=True)

    def _read_variable_settings(self):
        module, path = self.variable_module, self._source("variable_iteration.py")
        self.failure_handling = _choice_setting(module, path, "FAILURE_HANDLING",
                                                FAILURE_HANDLINGS)
        self.folder_location = _choice_setting(module, path, "TASK_FOLDER_LOCATION",
                                               FOLDER_LOCATIONS)

    def _read_resource_settings(self, constraints):
        path = self._source("resource_constraints.py")
        self.num_workers = _number_setting(constraints, path, "NUM_WORKERS", 1, 1, integer=True)
        self.gpus_per_worker, self.workers_per_gpu = _gpus_per_worker(constraints, path)
        self.avoid_gpus = _gpu_list_setting(constraints, path, "AVOID_GPUS")
        self.include_gpus = _gpu_list_setting(constraints, path, "INCLUDE_GPUS")
        self.cpus_per_worker = _number_setting(constraints, path, "CPUS_PER_WORKER", None, 1,
                                               integer=True, allow_none=True)
        self.pin_cpus = _flag_setting(constraints, path, "PIN_CPUS")
        self.constraints_path = path
        if not self.gpus_per_worker:   # a GPU sweep checks this with the GPUs found
            _check_gpu_overlap(self, "")
        self._read_launcher_settings(constraints, path)

    def _read_launcher_settings(self, constraints, path):
        launcher = getattr(constraints, "LAUNCHER", "local")
        if isinstance(launcher, (list, tuple)):
            if not launcher or not all(isinstance(part, str) for part in launcher):
                raise ConfigError("LAUNCHER as a list must be a non-empty command prefix of "
                                  "strings, like [\"env\", \"X=1\"]",
                                  _setting_line(path, "LAUNCHER"))
            launcher = list(launcher)
        elif launcher not in LAUNCHERS:
            raise ConfigError("LAUNCHER = %r; use one of: %s, or a command prefix list"
                              % (launcher, ", ".join(LAUNCHERS)), _setting_line(path, "LAUNCHER"))
        self.launcher = launcher
        self.slurm_options = _string_list_setting(constraints, path, "SLURM_OPTIONS")
        self.ssh_options = _string_list_setting(constraints, path, "SSH_OPTIONS")
        self.remote_python = getattr(constraints, "REMOTE_PYTHON", None) or sys.executable
        self.hosts = []
        for entry in _string_list_setting(constraints, path, "HOSTS"):
            host, _, count = entry.partition(":")
            if not host or (count and not count.isdigit()) or count == "0":
                raise ConfigError("HOSTS entry %r; write \"host\" or \"host:N\" (N workers "
                                  "there)" % entry, _setting_line(path, "HOSTS"))
            self.hosts.append((host, int(count) if count else self.num_workers))
        if self.pin_cpus and launcher != "local":
            raise ConfigError("PIN_CPUS pins workers to cores of this machine; it works with "
                              "LAUNCHER = \"local\" only (Slurm pins with --cpu-bind)",
                              _setting_line(path, "PIN_CPUS"))
        if launcher == "ssh" and not self.hosts:
            raise ConfigError("LAUNCHER = \"ssh\" needs HOSTS, like [\"node1\", \"node2:4\"]",
                              _setting_line(path, "LAUNCHER"))
        if launcher == "slurm" and self.workers_per_gpu > 1 and not any(
                option.startswith(("--gpus", "--gres", "-G")) for option in self.slurm_options):
            raise ConfigError("NUM_GPUS_PER_WORKER = 1/%d cannot be asked of Slurm (it hands "
                              "out whole GPUs); use a whole number, or put your own --gres/"
                              "--gpus option in SLURM_OPTIONS" % self.workers_per_gpu,
                              _setting_line(path, "NUM_GPUS_PER_WORKER"))

    def _build_variable_set(self):
        path = self.path("variable_iteration.py")
        variable_set = VariableSet()
        try:
            self.variable_module.setup_variable_set(variable_set)
        except ConfigError as exc:
            if exc.where is None:
                exc.where = _user_frame(exc.__traceback__, path)
            raise
        except Exception as exc:
            raise ConfigError("setup_variable_set raised %s: %s" % (type(exc).__name__, exc),
                              _user_frame(exc.__traceback__, path) or _display_path(path))
        if not variable_set.variables:
            raise ConfigError("setup_variable_set added no variables; call "
                              "variable_set.add_variable(name=..., values=[...])",
                              _display_path(path))
        # A converter that is not a function would be skipped, and every task
        # would get the raw value without a word.
        _check_hooks(self.variable_module, path,
                     [variable.name + "_to_value" for variable in variable_set.variables])
        for variable in variable_set.variables:
            function = getattr(self.variable_module, variable.name + "_to_value", None)
            if variable.to_value is not None and function is not None:
                raise ConfigError(
                    "variable %r has two converters: to_value= in its add_variable and %s "
                    "here; keep one of them" % (variable.name, function.__name__),
                    _definition_site(function) or _display_path(path))
        return variable_set

    def converters(self):
        """{variable name: converter}: the NAME_to_value functions of
        variable_iteration.py, and the to_value ones a worker imported."""
        module = self.variable_module
        found = {name[:-len("_to_value")]: getattr(module, name) for name in dir(module)
                 if name.endswith("_to_value") and callable(getattr(module, name))}
        found.update(self.imported_converters)
        return found


def _json_plain(value):
    """``value`` as JSON holds it: tuples and sets as lists, a float that
    JSON cannot hold (inf) and any other object as its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_plain(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _enter_project(project):
    """The project as the working directory and first on sys.path, and its
    threadward/ folder last on it: spawned and forkserver children
    (multiprocessing, loky, a DataLoader) import the functions of the
    project files by their module names.  Returns what undoes it."""
    previous = os.getcwd()
    os.chdir(project.directory)
    sys.path.insert(0, project.directory)
    sys.path.append(project.config_dir)

    def leave():
        os.chdir(previous)
        sys.path.remove(project.directory)
        sys.path.remove(project.config_dir)
    return leave


###############################################################################
# Sweeps from code ############################################################
###############################################################################

# Threadward(directory, task=train, variables=variable_set, num_workers=4,
# before_each_worker=setup) declares a sweep in Python and reads none of the
# three files: each of their settings is a keyword of the same name in lower
# case, each hook a keyword of its own name.  A worker is another
# interpreter, so what it runs (the task, the task and worker hooks, the
# converters) must be importable by name: the main process writes where each
# one is into task_queue/sweep.json and starts its workers with --sweep,
# and they import them (the running script by its path, as multiprocessing's
# spawn does).  The hooks of the main process (before_all_tasks,
# after_all_tasks, on_task_success, on_task_failure) are called as given.

SWEEP_FILE = "sweep.json"
# Run by workers, so imported there by name.
_WORKER_FUNCTIONS = ("task_method",) + TASK_HOOKS + WORKER_HOOKS
# Threadward's own arguments, for the list of valid keywords.
_ARGUMENTS = ("directory", "task", "variables", "fresh", "dry_run", "stdin_fd", "out")
# Names a user may reach for, from the files or from habit.
_KEYWORD_HINTS = {"task_method": "task", "variable_set": "variables",
                  "setup_variable_set": "variables", "project_dir": "directory"}

# While a worker imports what it runs: a Threadward.run() now is the script
# starting its sweep again, in every worker (the code lacks a __main__ guard).
_importing_for_worker = False


class _CallSite:
    """Where a sweep from code was declared ("exp.py:12"), in the place of a
    project file's path: the error for a bad setting names the keyword there."""

    def __init__(self, where):
        self.where = where

    def keyword(self, setting):
        return "%s (the keyword %s=)" % (self.where, setting.lower())

    def __str__(self):
        return self.where


def _caller():
    """(file, line) of the innermost frame outside this module: the user's call."""
    frame, here = sys._getframe(1), _caller.__code__.co_filename
    while frame is not None and frame.f_code.co_filename == here:
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else (None, None)


def _caller_site():
    filename, line = _caller()
    return "%s:%d" % (_display_path(filename), line) if filename else None


def _script_line():
    """The line of the running script's own top-level code now running (the
    `main()` that led here, say), or None."""
    main = getattr(sys.modules.get("__main__"), "__dict__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is main and frame.f_code.co_name == "<module>":
            return frame.f_lineno
        frame = frame.f_back
    return None


def _definition_site(function):
    """'file:line' where ``function`` was defined, if that is a file."""
    code = getattr(function, "__code__", None)
    if code is None or not os.path.isfile(code.co_filename):
        return None
    return "%s:%d" % (_display_path(code.co_filename), code.co_firstlineno)


def _attribute(owner, qualname):
    """What the dotted ``qualname`` names in ``owner`` (a module), or None."""
    try:
        for part in qualname.split("."):
            owner = getattr(owner, part)
    except AttributeError:
        return None
    return owner


def _function_reference(function, role, where):
    """How a worker finds ``function``: {"module": NAME, "qualname": Q}, or
    {"script": PATH, "qualname": Q} for one of the running script.  What no
    other process can import (a lambda, a nested function, one typed into a
    notebook or the interpreter) is a ConfigError saying to move it into a
    module; ``role`` names it ("task"), ``where`` is the user's call."""
    if not callable(function):
        raise ConfigError("%s=%r is not a function; pass one defined with `def`"
                          % (role, function), where)
    qualname = getattr(function, "__qualname__", None)
    module_name = getattr(function, "__module__", None)
    defined = _definition_site(function) or where
    why = "workers are other processes: they import what they run, by module and name"
    if not isinstance(qualname, str) or not isinstance(module_name, str):
        raise ConfigError("%s=%r has no name to be imported by (%s); pass a function defined "
                          "with `def` at the top level of a module" % (role, function, why),
                          where)
    if "<lambda>" in qualname:
        raise ConfigError("%s is a lambda, which has no name to be imported by (%s); define "
                          "it with `def` at the top level of a module and pass that"
                          % (role, why), defined)
    if "<locals>" in qualname:
        outer, _, name = qualname.rpartition(".<locals>.")
        raise ConfigError("%s is %s, a function defined inside %s(), which cannot be imported "
                          "(%s); move it to the top level of a module"
                          % (role, name, outer.replace(".<locals>", ""), why), defined)
    if isinstance(function, types.MethodType) and not isinstance(function.__self__, type):
        raise ConfigError("%s is %s of a %s object, which cannot be imported (%s); pass a "
                          "function of a module's top level (it may make the object itself)"
                          % (role, qualname, type(function.__self__).__name__, why), defined)
    if module_name == "__main__":
        module, reference = _main_reference(function, role, where, why)
    else:
        module, reference = sys.modules.get(module_name), {"module": module_name}
    # == rather than is: a classmethod is a new bound method at each look-up.
    if module is None or _attribute(module, qualname) != function:
        raise ConfigError("%s is not what its name, %s.%s, is in its module (it was replaced "
                          "there, or made elsewhere), so a worker would import something else; "
                          "pass a function its module defines under that name"
                          % (role, module_name, qualname), defined)
    reference["qualname"] = qualname
    return reference


def _main_reference(function, role, where, why):
    """(module, reference) of a function of the running script."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    code = getattr(function, "__code__", None)
    if path is None or (code is not None and
                        os.path.abspath(code.co_filename) != os.path.abspath(path)):
        raise ConfigError("%s is %s, defined in a notebook or typed into the interpreter, where "
                          "no worker can import it from (%s); move it into a module (a .py "
                          "file beside the notebook), import it, and pass that"
                          % (role, function.__qualname__, why), where)
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name and name != "__main__":
        return main, {"module": name}    # `python -m package.module`
    return main, {"script": os.path.abspath(path)}


def _runs_when_imported(path, line):
    """Whether line ``line`` of the script ``path`` runs when the script is
    imported: it is outside every function, class and
    `if __name__ == "__main__":` block."""
    import ast
    try:
        with open(path) as stream:
            nodes = ast.parse(stream.read()).body
    except (OSError, SyntaxError, ValueError):
        return False
    while True:
        node = next((n for n in nodes if n.lineno <= line <= (n.end_lineno or n.lineno)), None)
        if node is None or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                             ast.ClassDef)) or _is_main_guard(node):
            return False
        nodes = [child for field in ("body", "orelse", "handlers", "finalbody")
                 for child in getattr(node, field, ())]
        if not nodes:
            return True


def _is_main_guard(node):
    """Whether ``node`` is `if __name__ == "__main__":`."""
    import ast
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare) or \
            [type(op) for op in node.test.ops] != [ast.Eq]:
        return False
    sides = [node.test.left] + node.test.comparators
    return {getattr(side, "id", None) for side in sides} - {None} == {"__name__"} and \
        {getattr(side, "value", None) for side in sides} - {None} == {"__main__"}


def _read_json(path):
    with open(path) as stream:
        return json.load(stream)


class _Sweep:
    """A sweep declared in code: the task, the VariableSet, the settings
    (keywords in lower case) and the hooks, checked as they are given, so
    that a mistake is a ConfigError at the user's call, before anything runs."""

    def __init__(self, task, variables, keywords):
        self.where = _caller_site()
        self.call_site = _CallSite(self.where)
        self.settings = {}   # NAME -> value
        self.hooks = {}      # hook name -> function
        hook_names = MAIN_HOOKS + WORKER_HOOKS + TASK_HOOKS + RESULT_HOOKS
        for keyword, value in keywords.items():
            if keyword.islower() and _settings_file(keyword.upper()):
                self.settings[keyword.upper()] = value
            elif keyword in hook_names:
                if value is not None:
                    self.hooks[keyword] = value
            else:
                raise ConfigError(_unknown_keyword(keyword), self.where)
        if task is None or variables is None:
            raise ConfigError("a sweep from code needs both task= (the function each task "
                              "runs) and variables= (a threadward.VariableSet); without them, "
                              "Threadward(directory) runs the project files of "
                              "directory/threadward/, and takes no settings or hooks",
                              self.where)
        if not isinstance(variables, VariableSet):
            raise ConfigError("variables=%r; give a threadward.VariableSet, filled with "
                              "add_variable(name=..., values=[...])" % (variables,), self.where)
        if not variables.variables:
            raise ConfigError("variables= has no variables; call "
                              "add_variable(name=..., values=[...]) on it first", self.where)
        self.task, self.variables = task, variables
        self.references = {"task_method": _function_reference(task, "task", self.where)}
        for name, function in self.hooks.items():
            if name in _WORKER_FUNCTIONS:
                self.references[name] = _function_reference(function, name, self.where)
            elif not callable(function):
                raise ConfigError("%s=%r is not a function" % (name, function), self.where)
        scripts = {r["script"] for r in self.references.values() if "script" in r} | {
            v.reference["script"] for v in variables.variables
            if v.reference and "script" in v.reference}
        line = _script_line() if scripts else None
        if line is not None and _runs_when_imported(scripts.pop(), line):
            raise ConfigError(
                "workers import this script to find what they run, and this line would run "
                "the sweep again in each of them; put it under `if __name__ == \"__main__\":`",
                "%s:%d" % (_display_path(sys.modules["__main__"].__file__), line))
        # As the main process has them now: workers need them to import the same
        # modules (relative entries are relative to this working directory).
        self.sys_path = [os.path.abspath(entry) for entry in sys.path if isinstance(entry, str)]
        self.argv = list(sys.argv)

    def modules(self):
        """Stand-ins for the modules of the three project files, in
        _Project's order: (task_specification, variable_iteration,
        resource_constraints), holding the settings and hooks."""
        contents = {filename: {} for filename in CONFIG_FILES}
        for name, value in self.settings.items():
            contents[_settings_file(name)][name] = value
        for name, function in self.hooks.items():
            filename = "variable_iteration.py" if name in RESULT_HOOKS else \
                "task_specification.py"
            contents[filename][name] = function
        contents["task_specification.py"]["task_method"] = self.task
        return tuple(types.SimpleNamespace(**contents[filename]) for filename in (
            "task_specification.py", "variable_iteration.py", "resource_constraints.py"))

    def worker_spec(self):
        """What sweep.json tells a worker (the converters are the project's)."""
        return {"where": self.where, "sys_path": self.sys_path, "argv": self.argv,
                "functions": self.references,
                "settings": {name: value for name, value in self.settings.items()
                             if _settings_file(name) != "resource_constraints.py"}}


def _settings_file(name):
    """The project file whose setting ``name`` is, or None."""
    return next((filename for filename, names in SETTINGS.items() if name in names), None)


def _unknown_keyword(keyword):
    valid = list(_ARGUMENTS) + [name.lower() for names in SETTINGS.values() for name in names]
    valid += MAIN_HOOKS + WORKER_HOOKS + TASK_HOOKS + RESULT_HOOKS
    guess = _KEYWORD_HINTS.get(keyword) or next(
        (name for name in valid if keyword.lower() == name or _slip(keyword.lower(), name)),
        None)
    return "Threadward() has no keyword %s=%s; its keywords are: %s" % (
        keyword, " (did you mean %s=?)" % guess if guess else "", ", ".join(valid))


def _import_sweep(spec):
    """(In a worker.)  Stand-ins for the task and variable modules, made of
    what sweep.json names, imported as the main process had them."""
    sys.argv[:] = spec["argv"]   # as spawn does: a script may read it as it is imported
    sys.path[1:1] = [entry for entry in spec["sys_path"] if entry not in sys.path]
    task = {name: _import_reference(reference, name if name != "task_method" else "task")
            for name, reference in spec["functions"].items()}
    variables = {}
    for name, value in spec["settings"].items():
        (task if _settings_file(name) == "task_specification.py" else variables)[name] = value
    return types.SimpleNamespace(**task), types.SimpleNamespace(**variables)


def _import_reference(reference, role):
    """(In a worker.)  The function ``reference`` names; ConfigError if it
    cannot be imported here."""
    global _importing_for_worker
    place = reference.get("script") or reference.get("module")
    _importing_for_worker = True
    try:
        if "script" in reference:
            module = _import_script(reference["script"])
        else:
            module = importlib.import_module(reference["module"])
    except ConfigError:
        raise   # the script started its sweep again as it was imported: said already
    except (Exception, SystemExit) as exc:
        raise ConfigError("a worker could not import %s from %s (%s: %s); it imports what the "
                          "main process could, with the same sys.path: make %s importable "
                          "there" % (role, place, type(exc).__name__, exc, place),
                          reference.get("script") and _user_frame(exc.__traceback__,
                                                                  reference["script"]))
    finally:
        _importing_for_worker = False
    function = _attribute(module, reference["qualname"])
    if function is None:
        raise ConfigError("a worker imported %s but found no %s in it for %s"
                          % (place, reference["qualname"], role))
    return function


def _import_script(path):
    """(In a worker.)  The main process's script, imported by its path as
    __mp_main__, the name multiprocessing's spawn gives it, so that its
    `if __name__ == "__main__":` block does not run.  It also stands as
    __main__, as under spawn, so that what names __main__ (a pickled
    function sent to a task's own spawn pool) is found in it."""
    module = sys.modules.get("__mp_main__")
    if module is not None and getattr(module, "__file__", None) == path:
        return module
    spec = importlib.util.spec_from_file_location("__mp_main__", path)
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("__main__")
    sys.modules["__mp_main__"] = sys.modules["__main__"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["__mp_main__"]
        sys.modules["__main__"] = previous
        raise
    return module


###############################################################################
# GPUs ########################################################################
###############################################################################

def _check_gpu_overlap(project, found_note):
    overlap = sorted(set(project.avoid_gpus or ()) & set(project.include_gpus or ()))
    if overlap:
        raise ConfigError("GPUs %s are in both INCLUDE_GPUS and AVOID_GPUS; keep each GPU in "
                          "one list%s" % (", ".join(overlap), found_note),
                          _setting_line(project.constraints_path, "AVOID_GPUS"))


def _discover_gpus(project):
    """[(index string, uuid)] of this machine's GPUs, via GPUtil (nvidia-smi)."""
    where = _setting_line(project.constraints_path, "NUM_GPUS_PER_WORKER")
    try:
        gputil = _import_gputil()
    except ConfigError as exc:
        exc.where = where
        raise
    try:
        gpus = gputil.getGPUs()
    except Exception as exc:
        raise ConfigError("GPUs were requested but GPUtil could not list them (%s); is "
                          "nvidia-smi working?" % _one_line(exc), where)
    if not gpus:
        import shutil
        raise ConfigError(
            "GPUs were requested (NUM_GPUS_PER_WORKER) but none were found: %s; set "
            "NUM_GPUS_PER_WORKER = 0 for a CPU sweep" % (
                "nvidia-smi lists no GPUs" if shutil.which("nvidia-smi")
                else "nvidia-smi is not on PATH (no NVIDIA driver here?)"), where)

    return [(str(gpu.id), str(gpu.uuid)) for gpu in gpus]


def _plan_gpu_slots(project, found, parent_visible, num_workers=None, host=None):
    """The GPU share of every worker slot, in order: the first NUM_WORKERS
    start at once, the rest are the reserve for `add`.

    found: [(index, uuid)] from nvidia-smi.  parent_visible: the main
    process's CUDA_VISIBLE_DEVICES (None if unset), which bounds the choice;
    workers name their GPUs the same way it does (numbers or UUIDs).
    """
    where = _setting_line(project.constraints_path, "NUM_GPUS_PER_WORKER")
    num_workers = project.num_workers if num_workers is None else num_workers
    _check_gpu_overlap(project, " (found: %s)" % (", ".join(i for i, _ in found) or "none"))
    names = {index: index for index, _ in found}
    usable = [index for index, _ in found]
    description = ", ".join(usable) or "none"
    if host:
        description += " on %s" % host
    if parent_visible is not None:
        by_token = {}
        for index, uuid in found:
            by_token[index] = by_token[uuid] = index
        allowed = []
        for token in [t.strip() for t in parent_visible.split(",") if t.strip()]:
            match = by_token.get(token) or next(
                (i for u, i in by_token.items() if u.startswith("GPU-") and
                 token.startswith("GPU-") and u.startswith(token)), None)
            if match is None:
                raise ConfigError("CUDA_VISIBLE_DEVICES=%s names GPU %r, which nvidia-smi does "
                                  "not list (found: %s)" % (parent_visible, token, description))
            allowed.append(match)
            names[match] = token
        usable = [i for i in usable if i in allowed]
        description += " (CUDA_VISIBLE_DEVICES=%s allows %s)" % (
            parent_visible, ", ".join(usable) or "none")
    for setting in ("INCLUDE_GPUS", "AVOID_GPUS"):
        unknown = [g for g in getattr(project, setting.lower()) or () if g not in names]
        if unknown:
            raise ConfigError("%s names GPU %s, which this machine does not have (found: %s)"
                              % (setting, ", ".join(unknown), description),
                              _setting_line(project.constraints_path, setting))
    if project.include_gpus is not None:
        outside = [g for g in project.include_gpus if g not in usable]
        if outside:
            raise ConfigError("INCLUDE_GPUS names GPU %s, which CUDA_VISIBLE_DEVICES does not "
                              "allow (found: %s)" % (", ".join(outside), description),
                              _setting_line(project.constraints_path, "INCLUDE_GPUS"))
        usable = [g for g in usable if g in project.include_gpus]
    usable = [g for g in usable if g not in (project.avoid_gpus or ())]
    per_worker, share = project.gpus_per_worker, project.workers_per_gpu
    needed = -(-num_workers * per_worker // share)
    if needed > len(usable):
        raise ConfigError(
            "NUM_WORKERS = %d with NUM_GPUS_PER_WORKER = %s needs %d GPUs, but only %d can be "
            "used: %s (found: %s; INCLUDE_GPUS=%s, AVOID_GPUS=%s)"
            % (num_workers, per_worker if share == 1 else "1/%d" % share, needed,
               len(usable), ", ".join(usable) or "none", description,
               project.include_gpus, project.avoid_gpus), where)
    slots = []
    for start in range(0, len(usable) - per_worker + 1, per_worker):
        group = tuple(names[g] for g in usable[start:start + per_worker])
        slots.extend([group] * share)
    uuid_of_index = dict(found)
    return slots, {names[i]: uuid_of_index[i] for i in names}


###############################################################################
# Launchers ###################################################################
###############################################################################

class _Slot(collections.namedtuple("_Slot", "host gpus")):
    """Where a worker runs (host None: this machine) and its GPUs, as
    CUDA_VISIBLE_DEVICES entries.  A replacement worker reuses its slot."""


# Loads this file as the module `threadward` (an import, unlike running it as
# a script, uses the cached bytecode: a worker starts ~40 ms sooner) and calls
# main(); its directory comes first on sys.path, as for a script.
_WORKER_BOOT = (
    "import sys, importlib.util as u; sys.path[0] = sys.argv[1].rpartition('/')[0]; "
    "s = u.spec_from_file_location('threadward', sys.argv[1]); m = u.module_from_spec(s); "
    "sys.modules['threadward'] = m; s.loader.exec_module(m); sys.exit(m.main(sys.argv[2:]))")


def _worker_argv(worker_id, directory, report_stats=False, read_spec=False):
    """This very file in worker mode (a vendored copy loads itself);
    ``read_spec``: the worker imports what task_queue/sweep.json says."""
    return [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__), WORKER_MODE,
            directory, str(worker_id)] + (["--report-stats"] if report_stats else []) + (
                ["--sweep"] if read_spec else [])


def _ssh_gpus(project, host):
    """[(index, uuid)] of a remote host's GPUs, asked over ssh at start-up."""
    command = ["ssh"] + SSH_DEFAULTS + project.ssh_options + [
        host, "nvidia-smi --query-gpu=index,uuid --format=csv,noheader"]
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError("could not ask %s for its GPUs over ssh: %s" % (host, exc))
    if result.returncode != 0:
        raise ConfigError("could not ask %s for its GPUs over ssh (exit %d): %s" % (
            host, result.returncode, _one_line(result.stderr) or "no message"))
    found = []
    for line in result.stdout.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) >= 2 and fields[0].isdigit():
            found.append((fields[0], fields[1]))
    return found


class _Launcher:
    """How a worker process is started: on this machine ("local"), as a Slurm
    job step ("slurm"), over ssh ("ssh"), or behind the user's command prefix.

    Whatever the launcher, the worker's stdin and stdout reach the worker
    program, so the protocol is the same; only the main process's view of the
    worker's process tree differs, so non-local workers report their own
    CPU, RAM and GPU memory.
    """

    def __init__(self, project):
        self.project = project
        self.kind = project.launcher if isinstance(project.launcher, str) else "command"
        # Anything but "local" puts a launcher between us and the worker: we
        # read its stderr, and the worker reports its own figures.
        self.indirect = self.kind != "local"
        self.cpu_threads = 1       # each worker's thread count (plan_cpus)
        self.cores = []            # the usable cores of this machine

    def plan_cpus(self, workers):
        """Each of ``workers`` gets CPUS_PER_WORKER threads, or its share of
        the cores this process may use (inside a Slurm allocation: its CPUs
        on this node), at least one."""
        try:
            self.cores = sorted(os.sched_getaffinity(0))
        except AttributeError:   # not Linux
            self.cores = list(range(os.cpu_count() or 1))
        count = len(self.cores)
        if os.environ.get("SLURM_CPUS_ON_NODE", "").isdigit():
            count = min(count, int(os.environ["SLURM_CPUS_ON_NODE"]))
        self.cpu_threads = self.project.cpus_per_worker or max(1, count // max(1, workers))

    def cores_of(self, slot):
        """PIN_CPUS: the cores of a slot, blocks of cpu_threads in turn."""
        cores, size = self.cores, min(self.cpu_threads, len(self.cores))
        start = slot * size % len(cores)
        return (cores + cores)[start:start + size]

    def cpu_summary(self):
        """How the CPU is shared, for `show` and --dry-run."""
        kept = [name for name in THREAD_VARIABLES if name in os.environ]
        text = "%s per worker" % _plural(self.cpu_threads, "CPU thread")
        if self.project.pin_cpus:
            text += ", each pinned to cores of its own"
        if kept:
            text += " (%s as set: kept)" % ", ".join(
                "%s=%s" % (name, os.environ[name]) for name in kept)
        return text + ("; CPUS_PER_WORKER sets it" if not self.project.cpus_per_worker else "")

    def worker_environment(self, worker):
        """What a worker's environment adds: its GPUs and its CPU share."""
        extra = {"CUDA_VISIBLE_DEVICES": ",".join(worker.gpus),
                 "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        extra.update((name, str(self.cpu_threads)) for name in THREAD_VARIABLES
                     if name not in os.environ)
        if self.project.pin_cpus:
            extra[CPUS_ENV] = ",".join(str(core) for core in self.cores_of(worker.slot))
        return extra

    def check_available(self):
        import shutil
        program = {"slurm": "srun", "ssh": "ssh"}.get(self.kind)
        if self.kind == "command":
            program = self.project.launcher[0]
        if program and not shutil.which(program):
            raise ConfigError("LAUNCHER = %r needs %r, which is not on PATH" % (
                self.project.launcher, program),
                _setting_line(self.project.constraints_path, "LAUNCHER"))

    def plan_slots(self):
        """(every slot in order, how many start at once, GPU UUID by name);
        slots past the first ones are the reserve for `add`."""
        project = self.project
        if self.kind == "ssh":
            return self._plan_ssh_slots()
        if self.kind == "slurm" or not project.gpus_per_worker:
            return [_Slot(None, ())] * project.num_workers, project.num_workers, {}
        try:
            found = _discover_gpus(project)
        except ConfigError:
            _check_gpu_overlap(project, " (and no GPUs were found)")
            raise
        gpu_slots, uuids = _plan_gpu_slots(project, found,
                                           os.environ.get("CUDA_VISIBLE_DEVICES"))
        return [_Slot(None, gpus) for gpus in gpu_slots], project.num_workers, uuids

    def _plan_ssh_slots(self):
        starting, reserve = [], []
        for host, count in self.project.hosts:
            if not self.project.gpus_per_worker:
                starting.extend([_Slot(host, ())] * count)
                continue
            gpu_slots, _ = _plan_gpu_slots(self.project, _ssh_gpus(self.project, host), None,
                                           count, host)
            starting.extend(_Slot(host, gpus) for gpus in gpu_slots[:count])
            reserve.extend(_Slot(host, gpus) for gpus in gpu_slots[count:])
        return starting + reserve, len(starting), {}

    def command(self, worker, directory):
        """(argv, environment) that start ``worker``."""
        gpus = ",".join(worker.gpus)
        argv = _worker_argv(worker.worker_id, directory, report_stats=self.indirect,
                            read_spec=self.project.workers_read_spec)
        extra = self.worker_environment(worker)
        env = dict(os.environ, **extra)
        if self.kind == "slurm":
            count = self.project.gpus_per_worker
            step = ["srun", "--nodes=1", "--ntasks=1", "--job-name=threadward-%d"
                    % worker.worker_id]
            if os.environ.get("SLURM_JOB_ID"):
                step.append("--exact")     # concurrent steps share the allocation
            if count:
                step.append("--gpus=%d" % count)
                del env["CUDA_VISIBLE_DEVICES"]   # Slurm picks the GPUs and sets it
            return step + self.project.slurm_options + argv, env
        if self.kind == "ssh":
            # ssh passes no environment and starts in $HOME: say everything.
            remote = "cd %s && exec env %s %s" % (
                shlex.quote(directory),
                " ".join(shlex.quote("%s=%s" % item) for item in sorted(extra.items())),
                " ".join(shlex.quote(part) for part in [self.project.remote_python] + argv[1:]))
            return ["ssh"] + SSH_DEFAULTS + self.project.ssh_options + [worker.host, remote], env
        if self.kind == "command":
            prefix = [part.replace("{worker_id}", str(worker.worker_id)).replace("{gpus}", gpus)
                      for part in self.project.launcher]
            return prefix + argv, env
        return argv, env


class _Places:
    """Where workers run: the slots the launcher planned (_Slot: host and
    GPUs), the first ``starting`` of them taken at the start and the rest in
    reserve for `add`; which are free; and the retries of slots whose worker
    failed to start (the n-th in a row waits n * START_RETRY_DELAY s; after
    MAX_START_FAILURES the slot is given up)."""

    def __init__(self, slots, starting):
        self.slots = slots
        self.starting = starting
        self.free = list(range(len(slots)))
        self.retries = []            # (when, slot)
        self._failures = collections.Counter()   # slot -> failed starts in a row
        self._next_id = 0

    def new_worker_id(self):
        self._next_id += 1
        return self._next_id - 1

    def take(self):
        """A free slot (the first), or None."""
        return self.free.pop(0) if self.free else None

    def give_back(self, slot):
        self.free.append(slot)
        self.free.sort()

    def add_like_the_first(self):
        """One more slot like the first (`add` with no GPUs to reserve)."""
        self.slots.append(self.slots[0])
        self.free.append(len(self.slots) - 1)

    def started(self, slot):
        self._failures[slot] = 0

    def failed(self, slot):
        """A worker in ``slot`` failed to start: True if it is retried later."""
        self._failures[slot] += 1
        failures = self._failures[slot]
        if failures >= MAX_START_FAILURES:
            return False
        self.retries.append((time.monotonic() + failures * START_RETRY_DELAY, slot))
        return True

    def failures(self, slot):
        return self._failures[slot]

    def due(self, now):
        """The slots whose retry is due, taken off the list."""
        due = [slot for when, slot in self.retries if now >= when]
        self.retries = [(when, slot) for when, slot in self.retries if now < when]
        return due

    def in_use(self):
        return self.slots[:self.starting]

    def cap(self, total, project, launcher):
        """Never more workers than tasks to run (each costs a Python start
        and its memory before any task runs); the CPU share follows.
        Returns what to tell the user."""
        notes = []
        if self.starting > total:
            notes.append("NUM_WORKERS = %d, but only %s to run: starting %s" % (
                project.num_workers, _plural(total, "task"), _plural(total, "worker")))
            self.starting = total
            launcher.plan_cpus(total)
        cores = len(launcher.cores)
        if launcher.kind == "local" and not project.gpus_per_worker and self.starting > cores:
            notes.append("note: %d workers on %d cores and no GPUs: they will share the cores"
                         % (self.starting, cores))
        return notes

    def summary(self, project, launcher):
        """Where the workers run, for the first line of a run."""
        hosts = sorted({slot.host for slot in self.slots if slot.host})
        where = " on %s" % ", ".join(hosts) if hosts else (
            " as Slurm job steps" if launcher.kind == "slurm" else "")
        if not project.gpus_per_worker:
            return where + ", CPU only"
        if launcher.kind == "slurm":
            return where + ", %s GPU per worker chosen by Slurm" % project.gpus_per_worker
        used = sorted({g for slot in self.in_use() for g in slot.gpus})
        return where + ", GPUs %s" % ",".join(used)


def _dry_run_lines(project, places, launcher, selection=None, succeeded=frozenset()):
    """What `run --dry-run` prints: the tasks (the first ten) and where each
    worker would run.  With a ``selection`` (--only, --limit): what it
    selected, and the tasks a run would run (not those in ``succeeded``)."""
    count, done, shown = 0, 0, []
    variable_set = project.variable_set
    for indices in variable_set.iter_indices():
        if selection is not None:
            succeeded_before = bool(succeeded) and _task_id(
                variable_set.folder_names(indices), project.folder_location) in succeeded
            if not selection.takes(indices, succeeded_before):
                continue
            if succeeded_before:
                done += 1
                continue
        count += 1
        if len(shown) < 10:
            shown.append(_task_of(project, indices))
    if selection is None:
        lines = ["dry run: %d tasks; nothing is started" % count]
    else:
        lines = selection.lines() + ["dry run: %s to run%s; nothing is started" % (
            _plural(count, "task"), ", %d already succeeded" % done if done else "")]
    lines += ["  %-40s %s" % (task.task_id, _display_path(task.folder)) for task in shown]
    if count > len(shown):
        lines.append("  ... and %d more" % (count - len(shown)))
    lines.append("  CPU: %s" % launcher.cpu_summary())
    for number, slot in enumerate(places.in_use()):
        lines.append("  worker %d%s: CUDA_VISIBLE_DEVICES=%s%s" % (
            number, " on %s" % slot.host if slot.host else "",
            "(chosen by Slurm)" if launcher.kind == "slurm" and project.gpus_per_worker
            else ",".join(slot.gpus) or '""',
            ", cores %s" % ",".join(map(str, launcher.cores_of(number)))
            if project.pin_cpus else ""))
    reserve = len(places.slots) - places.starting
    if project.gpus_per_worker and reserve > 0:
        lines.append("  %d more worker slots in reserve for `add`" % reserve)
    return lines


###############################################################################
# Monitoring ##################################################################
###############################################################################


def _compute_apps(output):
    """[(pid, bytes of GPU memory, GPU UUID)] from `nvidia-smi
    --query-compute-apps=pid,used_memory,gpu_uuid --format=csv,noheader,nounits`."""
    apps = []
    for line in output.decode("utf-8", "replace").splitlines():
        fields = [field.strip() for field in line.split(",")]
        try:
            apps.append((int(fields[0]), int(float(fields[1])) * 1024 * 1024, fields[2]))
        except (IndexError, ValueError):
            continue   # "[N/A]" figures, or a blank line
    return apps


def _tree_usage(psutil, pids, known):
    """(CPU %, RSS bytes) summed over ``pids``, or (None, None) where none
    could be read (the worker is exiting: not 0 bytes).  ``known`` keeps the
    psutil.Process of each PID between samples: cpu_percent measures since
    the previous call on the same object."""
    cpu = rss = 0.0
    read = False
    for pid in pids:
        try:
            process = known.get(pid)
            if process is None:
                process = known[pid] = psutil.Process(pid)
                cpu += _lifetime_cpu_percent(process)
                process.cpu_percent(None)   # the baseline of the next sample
            else:
                cpu += process.cpu_percent(None)
            rss += process.memory_info().rss
            read = True
        except psutil.Error:
            known.pop(pid, None)
    return (int(round(cpu)), int(rss)) if read else (None, None)


def _lifetime_cpu_percent(process):
    """CPU % of a process first seen now, over its life so far.  Its first
    cpu_percent(None) has no interval to measure and says 0.0: a worker busy
    since it started, or a DataLoader worker forked since the last sample,
    would read idle.  (create_time has a clock tick's resolution: a process
    younger than 0.1 s is taken as 0.1 s old rather than read at 10 x.)"""
    times = process.cpu_times()
    age = max(time.time() - process.create_time(), 0.1)
    return 100.0 * (times.user + times.system) / age


def _update_stat(stats, name, value):
    stats[name] = value
    if value is not None:
        stats[name + "_max"] = max(value, stats.get(name + "_max") or 0)


def _write_status_file(path, state, table):
    """task_queue/status.json, for `threadward status` in another terminal;
    the error, or None."""
    try:
        _atomic_write(path, json.dumps({"state": state, "pid": os.getpid(),
                                        "updated": time.time(), "show": table},
                                       indent=1) + "\n")
    except OSError as exc:
        return "could not write %s: %s" % (path, exc)
    return None


class _Monitor:
    """CPU, RAM and GPU memory of each worker and all its descendants.

    psutil is sampled in the loop (each worker's process tree from the /proc
    children lists, then CPU and RSS per process).  nvidia-smi runs as a child
    whose stdout the selector reads like any worker pipe, so a slow or hung
    nvidia-smi never blocks the loop; a hung one is killed after
    NVIDIA_SMI_TIMEOUT and the figures show as unknown.
    """

    QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid",
             "--format=csv,noheader,nounits"]

    def __init__(self, selector, gpu_uuids):
        self._selector = selector
        self._gpu_uuids = gpu_uuids
        self._processes = {}      # pid -> psutil.Process, kept for cpu_percent's baseline
        self._descendants = {}    # worker id -> pids of the worker and its descendants
        self._query = None        # the running nvidia-smi, its output and deadline
        self._query_output = []
        self._query_deadline = None
        self._gpu_available = bool(gpu_uuids)

    def deadline(self):
        return self._query_deadline

    def pids(self):
        """The processes it has started (nvidia-smi, while it runs)."""
        return {self._query.pid} if self._query is not None else set()

    def sample(self, workers):
        """Refresh every worker's CPU % and RSS (its whole process tree)."""
        psutil = _import_psutil()   # at the first sample: 20 ms less before the first task
        if psutil is None:
            return
        seen = set()
        for worker in workers:
            # Each worker's tree from its children lists, not a pass over
            # every process: ~0.1 ms for 8 workers where that took 5-10 ms
            # (a task orphans nothing: workers are subreapers).
            pids = _descendants([worker.pid])
            self._descendants[worker.worker_id] = set(pids)
            seen.update(pids)
            cpu, rss = _tree_usage(psutil, pids, self._processes)
            _update_stat(worker.stats, "cpu", cpu)
            _update_stat(worker.stats, "rss", rss)
        for pid in list(self._processes):
            if pid not in seen:
                del self._processes[pid]
        alive = {worker.worker_id for worker in workers}
        for worker_id in list(self._descendants):
            if worker_id not in alive:
                del self._descendants[worker_id]

    def start_gpu_query(self, workers):
        """Start nvidia-smi unless one is running; its output arrives later.
        ``workers`` is called then, for the workers alive at that moment."""
        if not self._gpu_available or self._query is not None:
            return
        try:
            self._query = subprocess.Popen(self.QUERY, stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError:
            self._gpu_available = False
            return
        self._query_output = []
        self._query_deadline = time.monotonic() + NVIDIA_SMI_TIMEOUT
        self._selector.register(self._query.stdout.fileno(), selectors.EVENT_READ,
                                lambda: self._on_query_output(workers))

    def _on_query_output(self, workers):
        data = os.read(self._query.stdout.fileno(), READ_SIZE)
        if data:
            self._query_output.append(data)
            return
        self._finish_query()
        usage = collections.Counter()
        for pid, used, uuid in _compute_apps(b"".join(self._query_output)):
            usage[pid, uuid] += used
        for worker in workers():
            uuids = {self._gpu_uuids.get(gpu, gpu) for gpu in worker.gpus}
            pids = self._descendants.get(worker.worker_id, {worker.pid})
            _update_stat(worker.stats, "gpu", sum(
                used for (pid, uuid), used in usage.items() if pid in pids and uuid in uuids))

    def _finish_query(self):
        self._selector.unregister(self._query.stdout.fileno())
        self._query.stdout.close()
        if self._query.poll() is None:
            self._query.kill()
        self._query.wait()
        self._query = None
        self._query_deadline = None

    def expire(self, workers):
        """A hung nvidia-smi: kill it; GPU figures are unknown until the next one."""
        if self._query_deadline is not None and time.monotonic() >= self._query_deadline:
            self._finish_query()
            for worker in workers:
                worker.stats["gpu"] = None

    def close(self):
        if self._query is not None:
            self._finish_query()


###############################################################################
# Result files ################################################################
###############################################################################

class _RunLock:
    """One run per project: a POSIX record lock (fcntl.lockf, which NFS and
    Lustre hold for the whole cluster, not just this host) on
    task_queue/run.lock, held while the run lasts.  The file says who holds
    it; the kernel (or the NFS server) lets go when the holder dies, so a
    holder named in a file we could lock ended without letting go."""

    def __init__(self, path):
        self.path = path
        self._fd = None

    def acquire(self):
        """Lock, or raise naming the run that holds it; returns what to say
        of a crashed run's lock taken over ("" if none)."""
        import fcntl
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)   # NFS without lockd, Lustre mounted noflock
                _stderr("warning: this filesystem has no locks (%s): nothing keeps a second "
                        "`threadward run` off this project" % exc.strerror)
                return ""
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise ThreadwardError("cannot lock %s: %s" % (_display_path(self.path), exc))
            raise ThreadwardError(
                "another `threadward run` is using this project: %s. Wait for it to end, or "
                "stop it (`quit` in its console, or kill -TERM its PID on its host), then run "
                "again" % (holder or "a run on another host (%s)" % _display_path(self.path)))
        previous = os.read(fd, 4096).decode("utf-8", "replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, ("PID %d on %s since %s\n" % (
            os.getpid(), os.uname().nodename, time.strftime("%Y-%m-%d %H:%M:%S"))).encode(), 0)
        self._fd = fd
        if not previous:
            return ""
        return "taking over from a run that ended without letting go of the project (%s)%s" % (
            previous, "" if " on %s since " % os.uname().nodename in previous else
            "; if it is still going on there, stop this one: locks on this filesystem may "
            "not reach across hosts")

    def held(self):
        """Whether a run holds the lock now (None: this filesystem cannot
        say).  Never call it from the process that holds it: closing any of
        a process's descriptors of the file drops its POSIX locks."""
        import fcntl
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            return True if exc.errno in (errno.EACCES, errno.EAGAIN) else None
        finally:
            os.close(fd)   # lets go of the lock, if it was ours to take
        return False

    def release(self):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)   # emptied first: a next run sees a clean hand-over
            os.close(self._fd)          # closing lets go of the lock
            self._fd = None


# The lines of events.jsonl made once or more per task, without the JSON
# encoder's set-up (a million-task sweep makes three million; see B5).
_HAND_EVENT = '{"event": "hand", "run": %s, "time": %.3f, "id": %s, "worker": %d, "queued": %s}'
_START_EVENT = ('{"event": "start", "run": %s, "time": %.3f, "id": %s, "worker": %d, '
                '"attempt": %d}')
_TASK_EVENT = ('{"event": "task", "run": %s, "time": %.3f, "id": %s, "status": "%s", '
               '"reason": %s, "seconds": %s, "load": %s, "attempt": %d, "worker": %s%s}')


class _Ledger:
    """successful_tasks.txt and failed_tasks.txt, the event record
    events.jsonl, and the counts, progress, ETA and summary that follow.

    The result files hold each task's final outcome, as reruns read it.
    events.jsonl, kept across runs, holds the history, one JSON object per
    line, each with "event", "run" (the run's ID) and "time" (Unix time)::

        run     where each run starts: "fresh", "tasks", "skipped", "pid",
                "host", "version", "schema", "settings" (every setting),
                "variables" ([{"name", "converter": bool}], top level
                first), "workers" (starting), "gpus"
        worker  "worker" (its ID), "state": "start" ("slot", "gpus", "why":
                start | add | replace (with "replaces") | retry), "ready"
                ("pid", "host"), "remove" (the console's), "stop" (told to
                shut down: nothing left for it, or the run stops), "exit"
                ("cause", "code")
        hand    a task sent to a worker: "id", "worker", "queued" (behind
                the one it is running)
        start   it begins there: "id", "worker", "attempt" (as this process
                sees it: when it was sent, or the answer before it came)
        back    it came back unstarted (a cancel, its worker gone) and runs
                later: a "start" noted for it since its "hand" did not happen
        task    an attempt's end: "id", "status" (succeeded, failed,
                interrupted, or retrying: a failure that runs again),
                "reason", "seconds" (the worker's clock), "load" (seconds
                of it in converters), "attempt", "worker", "converted"
                (the levels whose converters ran, when any did)
        sample  every STATUS_INTERVAL s: "workers": {ID: {"cpu", "rss", "gpu"}}
        end     the run's end: "succeeded", "failed", "not_run", "retried",
                "stopped" (why it stopped early, or null)

    `results` reads seconds and attempts from the "task" lines, `report`
    draws them all.

    Lines recorded during a pass of the main loop are appended at its end
    (``write``): whole lines, one write per file (O_APPEND), so a crash
    leaves no half line, and a task whose line is lost is only run again.
    The events go first: a crash between the writes leaves an outcome in
    the record that the result files lack, and the next run, which runs the
    task again, records it anew; never the other way round, which no run
    would correct.  A torn last line left by a crash is dropped when the
    files are opened (and ignored where events.jsonl is read)."""

    def __init__(self, queue_dir):
        self.queue_dir = queue_dir
        self._fds = {}
        self._unwritten = {}          # result file name -> lines not yet written
        self._failed_attempts = {}    # task ID -> its failed attempts, while it is retried
        self._events = []             # events.jsonl lines not yet written
        self._timeline = TIMELINE_EVENTS
        self._run = None              # this run's ID as JSON text
        self.succeeded = self.failed = self.skipped = 0
        self.retried = 0              # failed attempts that ran again
        self.total = 0                # tasks to run in this run
        self.started = None           # monotonic time the run started
        self._finish_at = None        # the estimated end of the sweep (monotonic)
        self._durations = _Stat()     # seconds of the tasks recorded
        self._last_progress = (0.0, 0)

    def path(self, name):
        return os.path.join(self.queue_dir, name)

    def read_succeeded(self):
        """IDs in successful_tasks.txt (a torn last line is not one)."""
        try:
            with open(self.path("successful_tasks.txt"), "rb") as stream:
                data = stream.read()
        except FileNotFoundError:
            return set()
        lines = data.split(b"\n")
        lines.pop()   # empty after a final newline; a torn last line otherwise
        return {line.decode("utf-8", "replace") for line in lines if line}

    def forget(self, task_ids):
        """Drop ``task_ids`` from successful_tasks.txt (`run --fresh --only`:
        those run again, the other tasks' results stay), whole or not at all."""
        if not task_ids:
            return
        path = self.path("successful_tasks.txt")
        with open(path, "rb") as stream:
            lines = stream.read().split(b"\n")
        lines.pop()   # empty after a final newline; a torn last line otherwise
        kept = b"".join(line + b"\n" for line in lines
                        if line and line.decode("utf-8", "replace") not in task_ids)
        temporary = "%s.tmp%d" % (path, os.getpid())
        try:
            with open(temporary, "wb") as stream:
                stream.write(kept)
            os.replace(temporary, path)
        except OSError as exc:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise ThreadwardError("cannot rewrite %s: %s; nothing was run"
                                  % (_display_path(path), exc.strerror or exc))

    def open(self, fresh, header=None):
        """Open the files for appending: failed_tasks.txt starts empty each
        run (its tasks run again), successful_tasks.txt only when ``fresh``,
        events.jsonl never; it gets this run's "run" line now, with the
        fields of ``header`` (settings, variables, workers, GPUs)."""
        self.started = time.monotonic()
        for name in RESULT_FILES + (EVENTS_FILE,):
            truncate = name != EVENTS_FILE and (fresh or name == "failed_tasks.txt")
            fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_APPEND |
                         (os.O_TRUNC if truncate else 0), 0o666)
            self._fds[name] = fd
            self._drop_torn_line(fd)
        # Unique without reading the record (it grows by a line per task):
        # one run at a time holds the project, and none ends within the
        # millisecond it started in (a program may run several in a row).
        now = time.time()
        run = "%s.%03d-%d" % (time.strftime("%Y%m%d-%H%M%S", time.localtime(now)),
                              int(now % 1 * 1000), os.getpid())
        self._run = _json_text(run)
        # "fresh": the result files started empty, so earlier outcomes no
        # longer count (results() reads from the last such line on).
        line = {"event": "run", "run": run, "time": round(now, 3), "fresh": fresh,
                "tasks": self.total, "skipped": self.skipped, "pid": os.getpid(),
                "host": os.uname().nodename, "version": __version__, "schema": EVENTS_SCHEMA}
        line.update(header or {})
        _write_all(self._fds[EVENTS_FILE], (_json_text(line) + "\n").encode())

    @staticmethod
    def _drop_torn_line(fd):
        """A crash mid-write can leave a last line without its newline: drop it."""
        size = os.fstat(fd).st_size
        if not size:
            return
        with open(fd, "rb", closefd=False) as stream:
            start = max(0, size - 4096)
            stream.seek(start)
            tail = stream.read()
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            os.ftruncate(fd, start + cut + 1 if cut >= 0 else 0 if start == 0 else size)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def record(self, task_id, success, reason, seconds, load=0.0, attempt=1, worker=None,
               converted=()):
        """Count a task's final outcome (after ``attempt`` attempts, the last
        on worker ``worker``); its lines are written at the next ``write``.
        Returns the one-line reason recorded for a failure."""
        self._failed_attempts.pop(task_id, None)
        if seconds is not None:
            self._durations.add(seconds)
        if success:
            self.succeeded += 1
            self._unwritten.setdefault("successful_tasks.txt", []).append(task_id)
            status = "succeeded"
        else:
            self.failed += 1
            reason = _one_line(reason) or "failed"
            self._unwritten.setdefault("failed_tasks.txt", []).append(
                "%s\t%s" % (task_id, reason))
            status = "interrupted" if reason == Worker.INTERRUPTED else "failed"
        self._event(task_id, status, reason, seconds, load, attempt, worker, converted)
        self._estimate_finish()
        return reason

    def attempt_of(self, task_id):
        """The number of the attempt of ``task_id`` that has just ended."""
        return self._failed_attempts.get(task_id, 0) + 1

    def retry(self, task_id, reason, seconds, load, attempt, worker, converted=()):
        """A failed attempt whose task runs again: an event only (the result
        files get the final outcome).  Returns the one-line reason."""
        self.retried += 1
        self._failed_attempts[task_id] = attempt
        reason = _one_line(reason) or "failed"
        self._event(task_id, "retrying", reason, seconds, load, attempt, worker, converted)
        return reason

    def _event(self, task_id, status, reason, seconds, load, attempt, worker, converted):
        self._events.append(_TASK_EVENT % (
            self._run, time.time(), _json_text(task_id), status, _json_text(reason),
            "null" if seconds is None else "%.6f" % seconds, "%.6f" % load if load else "0",
            attempt, "null" if worker is None else worker,
            ', "converted": %s' % _json_text(list(converted)) if converted else ""))

    # -- the timeline's events ----------------------------------------------

    def note(self, kind, **fields):
        """A timeline event (worker, sample) of ``fields``; written with the
        pass's other lines."""
        if self._timeline:
            self._events.append('{"event": "%s", "run": %s, "time": %.3f%s' % (
                kind, self._run, time.time(), ", " + _json_text(fields)[1:] if fields else "}"))

    def handed(self, task, worker, queued):
        if self._timeline:
            self._events.append(_HAND_EVENT % (self._run, time.time(), _json_text(task.task_id),
                                               worker, "true" if queued else "false"))

    def began(self, task, worker):
        if self._timeline:
            self._events.append(_START_EVENT % (
                self._run, time.time(), _json_text(task.task_id), worker,
                self.attempt_of(task.task_id)))

    def finish(self, not_run, stopped):
        """The run's "end" line, written now with what is left; the error, or None."""
        self._events.append('{"event": "end", "run": %s, "time": %.3f, %s' % (
            self._run, time.time(), _json_text({
                "succeeded": self.succeeded, "failed": self.failed, "not_run": not_run,
                "retried": self.retried, "stopped": stopped})[1:]))
        return self.write()

    def write(self):
        """Append the lines recorded since the last write, the events first;
        the error, or None."""
        events, self._events = self._events, []
        unwritten, self._unwritten = self._unwritten, {}
        if events:
            try:
                _write_all(self._fds[EVENTS_FILE], ("\n".join(events) + "\n").encode())
            except OSError as exc:
                # The result lines are not written either: their tasks run again.
                return "cannot record %s in %s (%s)" % (
                    _plural(len(events), "event"), EVENTS_FILE, exc)
        errors = []
        for name, lines in unwritten.items():   # each file, whatever the other's fate
            try:
                _write_all(self._fds[name], ("\n".join(lines) + "\n").encode("utf-8"))
            except OSError as exc:
                errors.append("cannot record %s in %s (%s)" % (", ".join(lines), name, exc))
        return "; ".join(errors) or None

    # -- progress -----------------------------------------------------------

    @property
    def done(self):
        return self.succeeded + self.failed

    def elapsed(self):
        return time.monotonic() - self.started

    def eta(self):
        """Seconds left, from the finish time estimated at the last result:
        the progress line, `show` and status.json count down the same one."""
        if self._finish_at is None:
            return None
        return max(0.0, self._finish_at - time.monotonic())

    def _estimate_finish(self):
        self._finish_at = time.monotonic() + self.elapsed() / self.done * (
            self.total - self.done)

    def progress(self):
        """The progress line when one is due (each tenth of the tasks, and
        every PROGRESS_INTERVAL s while tasks finish), else None."""
        done = self.done
        last_time, last_done = self._last_progress
        now = time.monotonic()
        if done * 10 // self.total > last_done * 10 // self.total or (
                done != last_done and now - (last_time or self.started) >= PROGRESS_INTERVAL):
            self._last_progress = (now, done)
            return "[%s] %d/%d done, %d failed, ETA %s" % (
                _format_duration(self.elapsed()), done, self.total, self.failed,
                _format_duration(self.eta()))
        return None

    def bar(self, width, busy, idle, colour=False):
        """The progress bar's line, ``width`` columns at most (colour codes
        aside): the bar, done/total, failed, rate, the ETA (`show` and
        status.json read the same estimate), workers busy and idle."""
        done, total = self.done, self.total or 1
        elapsed = self.elapsed()
        facts = [("%d/%d" % (done, self.total), None)]
        if self.failed:
            facts.append(("%d failed" % self.failed, RED))
        facts += [(_format_rate(done / elapsed if done and elapsed > 0 else None), None),
                  ("ETA %s" % _format_duration(self.eta()), None),
                  ("workers: %d busy, %d idle" % (busy, idle), None)]
        cells = min(BAR_CELLS, width - 2 - sum(len(text) + 2 for text, _ in facts))
        if cells < 5:   # a narrow terminal: the figures, cut to fit, no bar
            return "  ".join(text for text, _ in facts)[:width]
        good = cells * self.succeeded // total
        bad = cells * done // total - good
        pieces = [("[", None), ("#" * good, GREEN), ("#" * bad, RED),
                  ("." * (cells - good - bad) + "]", None)]
        for fact in facts:
            pieces += [("  ", None), fact]
        return "".join(code + text + PLAIN if colour and code and text else text
                       for text, code in pieces)

    def overview(self, finished=False):
        """The first lines of `show` (``finished``: of a run that has ended,
        as status.json keeps it: no ETA, and what is left was not run)."""
        done, durations = self.done, self._durations
        return [
            "elapsed %s   %s   per task: avg %s, max %s" % (
                _format_duration(self.elapsed()),
                "finished" if finished else "ETA %s" % _format_duration(self.eta()),
                "%.2fs" % durations.mean() if durations.count else "?",
                "%.2fs" % durations.largest if durations.count else "?"),
            "tasks: %d succeeded, %d failed, %d skipped (done before), %d %s of %d%s" % (
                self.succeeded, self.failed, self.skipped, self.total - done,
                "not run" if finished else "remaining", self.total + self.skipped,
                self._retries_text("; "))]

    def _retries_text(self, separator):
        """'; 3 retries' (failed attempts that ran again), or "" if none."""
        if not self.retried:
            return ""
        return "%s%d %s" % (separator, self.retried, "retry" if self.retried == 1 else "retries")

    def summary(self, stopped, not_run):
        """The last lines of a run; ``stopped``: why it stopped early, if it did."""
        lines = ["%s in %s: %d succeeded, %d failed%s%s%s" % (
            "stopped (%s)" % stopped if stopped else "done",
            _format_duration(self.elapsed()), self.succeeded, self.failed,
            ", %d not run" % not_run if not_run else "",
            ", %d skipped (already succeeded)" % self.skipped if self.skipped else "",
            self._retries_text(", "))]
        if self.failed:
            lines.append("failed tasks are listed in %s; `threadward run` again retries them"
                         % _display_path(self.path("failed_tasks.txt")))
        return lines


###############################################################################
# Results table ###############################################################
###############################################################################
#
# threadward.results(DIR) and `threadward results`: one row per task of
# all_tasks.json, in generation order, read from the files alone.  The
# project's own files are not imported: a table can be read while they are
# being edited, or where the task's dependencies are not installed.

RESULT_FORMATS = ("csv", "jsonl", "markdown")
# A result key equal to an earlier column (a variable, task_id, status, ...)
# is given this prefix.
RESULT_PREFIX = "result."
# What the last event of a task says of it, as results() reports it: an
# interrupted task, and one whose retry never ended, failed.
_EVENT_STATUS = {"succeeded": "succeeded", "failed": "failed", "interrupted": "failed",
                 "retrying": "failed"}


def results(directory="."):
    """One dict per task of the project in ``directory``, in generation
    order (that of all_tasks.json, as the last run wrote it)::

        {"task_id": ..., "status": "succeeded" | "failed" | "not run",
         "reason": ..., "seconds": ..., "attempts": ...,
         <each variable by name>: its declared value,
         <each key of the task's result.json>: its value}

    ``seconds`` and ``attempts`` are those of the latest run that ran the
    task (``seconds``: its last attempt); the result keys are what its last
    attempt saved (none for a task not run); a result key equal to an
    earlier column is prefixed ``result.``.  ``pandas.DataFrame(results(d))`` is a
    data frame of the sweep.  Reads only files, and works while a run goes
    on (its running tasks show their outcome of the run before, if any)."""
    return [row for row, _ in _result_rows(directory)]


def _result_rows(directory):
    """(row, {variable: nickname}) per task: the nicknames are for --where."""
    project = _Project(directory)
    tasks = _read_task_list(project)
    outcome = _Outcomes(project.queue_dir)
    for entry in tasks:
        status, reason, seconds, attempts = outcome.of(entry["task_id"])
        row = {"task_id": entry["task_id"], "status": status, "reason": reason,
               "seconds": seconds, "attempts": attempts}
        nicknames = {}
        for name, declared in entry["variables"].items():
            row[name] = declared.get("value")
            nicknames[name] = declared.get("nickname")
        columns = set(row)
        # A task not run has no result: a file in its folder is of a run before.
        result = {} if status == "not run" else _read_result(
            os.path.join(project.directory, entry["task_folder"]))
        for key, value in result.items():
            row[RESULT_PREFIX + key if key in columns else key] = value
        yield row, nicknames


def _read_task_list(project):
    project.check_folder()
    path = os.path.join(project.queue_dir, "all_tasks.json")
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        data = b""
    if not data.strip():   # `init` leaves it empty
        raise ThreadwardError("%s has no tasks yet: the project has not been run; "
                              "`threadward run` writes it" % _display_path(path))
    try:
        return _json_decode(data.decode("utf-8"))
    except ValueError as exc:
        raise ThreadwardError("cannot read %s (%s); `threadward run` writes it again"
                              % (_display_path(path), exc))


def _read_result(folder):
    """The task's result.json as a dict ({} if there is none); one that is
    not a JSON object is left out, with a warning naming it."""
    path = os.path.join(folder, "result.json")
    try:
        with open(path, "rb") as stream:
            result = _json_decode(stream.read().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        result = exc
    if isinstance(result, dict):
        return result
    import warnings
    warnings.warn("%s is left out of the results: %s; a task's result.json must hold one "
                  "JSON object ({\"name\": value, ...})" % (
                      _display_path(path), result if isinstance(result, Exception)
                      else "it holds a %s" % type(result).__name__), stacklevel=3)
    return {}


class _Outcomes:
    """Each task's last outcome: from events.jsonl (the last event of the
    task in the latest run that ran it, from the last --fresh run on), and
    for a task it does not name (a project run before events were
    recorded), from successful_tasks.txt and failed_tasks.txt."""

    NOT_RUN = ("not run", "", None, 0)

    def __init__(self, queue_dir):
        self.queue_dir = queue_dir
        self.events = self._read_events(os.path.join(queue_dir, EVENTS_FILE))
        self._files = None   # (succeeded IDs, {failed ID: reason}), read if needed

    @staticmethod
    def _read_events(path):
        """{task ID: (status, reason, seconds, attempt)} of each task's last event."""
        last = {}
        try:
            stream = open(path, "rb")
        except FileNotFoundError:
            return last
        with stream:
            for line in stream:
                if not line.endswith(b"\n"):
                    break   # torn: its writer died mid-line
                try:
                    event = _json_decode(line.decode("utf-8"))
                    kind = event.get("event")
                except (ValueError, AttributeError):
                    continue   # not an event (glued to a torn line before a fix)
                if kind == "task":
                    last[event.get("id")] = (
                        _EVENT_STATUS.get(event.get("status"), "failed"),
                        event.get("reason") or "", event.get("seconds"), event.get("attempt"))
                elif kind == "run" and event.get("fresh"):
                    last.clear()   # the result files started empty there
        return last

    def of(self, task_id):
        """(status, reason, seconds, attempts) of a task."""
        found = self.events.get(task_id)
        if found is not None:
            return found
        if self._files is None:
            self._files = self._read_files()
        succeeded, failed = self._files
        if task_id in succeeded:
            return ("succeeded", "", None, 1)
        if task_id in failed:
            return ("failed", failed[task_id], None, 1)
        return self.NOT_RUN

    def _read_files(self):
        succeeded = _Ledger(self.queue_dir).read_succeeded()
        failed = {}
        try:
            with open(os.path.join(self.queue_dir, "failed_tasks.txt"), "rb") as stream:
                lines = stream.read().split(b"\n")
        except FileNotFoundError:
            lines = [b""]
        lines.pop()   # empty after a final newline; a torn last line otherwise
        for line in lines:
            task_id, _, reason = line.decode("utf-8", "replace").partition("\t")
            if task_id:
                failed[task_id] = reason
        return succeeded, failed


def _cell(value):
    """A value as the text of a CSV or markdown cell: None is empty, lists
    and dicts (from result.json) are JSON."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return _json_text(value)
    return str(value)


def _where_filter(conditions, rows):
    """The rows that --where NAME=VALUE ... selects: a condition holds when
    the column's value (as text, or as JSON: true, null) or a variable's
    nickname is VALUE; a NAME given twice takes either value, different
    NAMEs must all hold."""
    wanted = collections.OrderedDict()
    for condition in conditions:
        name, equals, value = condition.partition("=")
        if not equals or not name:
            raise ThreadwardError("--where %r: write NAME=VALUE, like --where model=gpt2"
                                  % condition)
        wanted.setdefault(name, set()).add(value)
    columns = set()
    for row, _ in rows:
        columns.update(row)
    unknown = [name for name in wanted if name not in columns]
    if rows and unknown:
        raise ThreadwardError("--where %s: no such column; the columns are: %s" % (
            unknown[0], ", ".join(_columns(row for row, _ in rows))))

    def spellings(row, nicknames, name):
        value = row.get(name)
        return {_cell(value), _json_text(value), nicknames.get(name)}

    # A variable's value that no task has is a slip (as with --only); a
    # status or result no row has yet is an empty table.
    for name, values in wanted.items():
        if not rows or name not in rows[0][1]:
            continue
        known = collections.OrderedDict()
        for row, nicknames in rows:
            known.setdefault(nicknames.get(name), spellings(row, nicknames, name))
        missing = sorted(values - set().union(*known.values()))
        if missing:
            raise ThreadwardError("--where %s=%s: no task has that %s; its values are: %s" % (
                name, missing[0], name, ", ".join(map(str, known))))

    def holds(row, nicknames, name, values):
        return bool(values & spellings(row, nicknames, name))
    return [(row, nicknames) for row, nicknames in rows
            if all(holds(row, nicknames, name, values) for name, values in wanted.items())]


def _columns(rows):
    """Every key of the rows, in the order first seen (result keys may
    differ from task to task)."""
    seen = collections.OrderedDict()
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _write_table(rows, columns, form, out):
    """The rows to ``out`` as CSV (a header line of ``columns`` first), JSON
    lines, or a markdown table."""
    if form == "jsonl":
        for row in rows:
            out.write(_json_text(row) + "\n")
        return
    if form == "csv":
        import csv
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])
        return

    def line(cells):
        return "| %s |\n" % " | ".join(
            " ".join(cell.replace("|", "\\|").split()) for cell in cells)
    out.write(line(columns))
    out.write("|%s\n" % ("---|" * len(columns)))
    for row in rows:
        out.write(line([_cell(row.get(column)) for column in columns]))


###############################################################################
# Report ######################################################################
###############################################################################
#
# threadward.report(DIR) and `threadward report`: one HTML page of the
# project's last run, drawn from events.jsonl alone (and all_tasks.json
# where task IDs do not spell out the variables; the project's files are not
# imported), written at the end of every run, and on demand, during a run
# too (from the events so far).
#
#   events.jsonl --_RunStory.read--> header, end, workers' lanes, samples,
#                                    and each attempt, tallied as it is read
#   _RunStory --_ReportPage--> header, timeline, loads, time by value,
#                              resources, failures --> report.html (whole)
#
# The page is self-contained (inline CSS and SVG; no script, font or
# request): hovering a shape shows its SVG <title>.  Its size, and the
# memory to make it, are bounded by the drawing, not the sweep: the time
# axis is known before the attempts are read (the run's end line, or now),
# so an attempt narrower than REPORT_MIN_BAR px is counted in its worker's
# bin of that width as it is read instead of kept; a resource line has a
# point per pixel column; a table shows REPORT_ROWS rows.

REPORT_FILE = "report.html"
REPORT_WIDTH = 1100   # px of the time axis
REPORT_LANE = 22      # px of a worker's lane
REPORT_MIN_BAR = 2    # px: an attempt narrower than this is drawn in its bin
REPORT_ROWS = 200     # rows of a table at most; the rest are counted
REPORT_VALUES = 30    # values of a variable in "time by value" at most
REPORT_DOTS = 60      # a resource line of this many points or fewer shows each
# Top-level values' colours, in order of appearance (then again); red is for failures.
REPORT_PALETTE = ("#4e79a7", "#59a14f", "#edc948", "#b07aa1", "#76b7b2", "#9c755f",
                  "#f28e2b", "#bab0ac", "#a0cbe8", "#8cd17d", "#d4a6c8", "#86bcb6")
REPORT_FAILED = "#d62728"
REPORT_INTERRUPTED = "#555"   # ended by a quit, a signal or a lost worker: it runs again
# Lines a finished run's page does not need (a running one's needs "start"
# and "back": they tell what runs now); the record's own format, checked
# by tests/test_report.py.
_HAND_LINE, _START_LINE, _BACK_LINE = (b'{"event": "hand"', b'{"event": "start"',
                                       b'{"event": "back"')
_json_scan = json.JSONDecoder().scan_once


class _Attempt:
    """One attempt of a task on a worker, begun and, unless it still runs, ended."""

    __slots__ = ("task_id", "worker", "begin", "end", "seconds", "load", "status",
                 "reason", "attempt", "converted")

    def __init__(self, task_id, worker, begin, attempt=1):
        self.task_id, self.worker, self.begin, self.attempt = task_id, worker, begin, attempt
        self.end = self.seconds = None
        self.load, self.status, self.reason, self.converted = 0.0, "running", "", ()

    @property
    def failed(self):
        return self.status not in ("succeeded", "running")


class _Lane:
    """A worker's life in the run, from its "worker" events, and what it ran."""

    __slots__ = ("worker", "slot", "gpus", "why", "replaces", "started", "ready", "pid",
                 "host", "removed", "stopped", "exited", "cause", "code", "tasks", "busy")

    def __init__(self, event):
        self.worker, self.started = event.get("worker"), event.get("time")
        self.slot, self.gpus = event.get("slot"), event.get("gpus") or []
        self.why, self.replaces = event.get("why") or "start", event.get("replaces")
        self.ready = self.pid = self.host = self.removed = self.stopped = self.exited = None
        self.cause = self.code = None
        self.tasks, self.busy = 0, 0.0


class _Bin:
    """The attempts too short to draw in REPORT_MIN_BAR px of a lane."""

    __slots__ = ("count", "busy", "failed", "colours", "alone")

    def __init__(self):
        self.count, self.busy, self.failed = 0, 0.0, 0
        self.colours = collections.Counter()   # colour -> seconds
        self.alone = None   # the attempt, while it is the only one: its own hover text


class _ValueStat:
    """Attempts, seconds, load seconds and failures of one variable value."""

    __slots__ = ("count", "seconds", "load", "failed")

    def __init__(self):
        self.count, self.seconds, self.load, self.failed = 0, 0.0, 0.0, 0


class _RunStory:
    """What events.jsonl says of the project's last run, tallied for the page."""

    def __init__(self, project, run, end, state, until):
        self.project = project
        self.run, self.end, self.state = run, end, state
        self.t0, self.t1 = run["time"], max(until, run["time"] + 1e-3)
        self.scale = REPORT_WIDTH / (self.t1 - self.t0)
        declared = run.get("variables") or []
        self.names = [variable["name"] for variable in declared]
        self.converter_levels = [level for level, variable in enumerate(declared)
                                 if variable.get("converter")]
        self._nicknames = None   # task ID -> nicknames, where IDs do not spell them
        if (run.get("settings") or {}).get("TASK_FOLDER_LOCATION") == "VARIABLE_UNDERSCORE":
            self._nicknames = self._read_nicknames()
        self.lanes = {}          # worker ID -> _Lane
        # "cpu", "rss", "gpu" -> {worker ID: {pixel column: largest reading there}}
        self.series = {key: {} for key in ("cpu", "rss", "gpu")}
        self.bars = []           # _Attempt drawn one by one
        self.bins = {}           # (worker, bin number) -> _Bin
        self.colours = collections.OrderedDict()   # top-level value -> colour
        self.outcomes = collections.Counter()      # status of each ended attempt
        self.by_value = [collections.OrderedDict() for _ in self.names]
        self.prefixes = {level: set() for level in self.converter_levels}
        self.calls = collections.Counter()         # level -> converter calls
        self.seconds = self.load = 0.0
        self.failures = collections.OrderedDict()  # task ID -> its attempts from a failure
        self.failures_left_out = 0                 # failed attempts of tasks not listed
        self._running = {}                         # task ID -> its _Attempt not yet ended

    # -- reading ------------------------------------------------------------

    @classmethod
    def read(cls, project):
        """The story of the last run (None if the record has none)."""
        path = os.path.join(project.queue_dir, EVENTS_FILE)
        try:
            stream = open(path, "rb")
        except FileNotFoundError:
            return None
        with stream:
            start = offset = 0
            last = b""
            for line in stream:   # bytes only: where the last run begins, its last line
                if line.startswith(b'{"event": "run"'):
                    start = offset
                if line.endswith(b"\n"):
                    last = line
                    offset += len(line)
            modified = os.fstat(stream.fileno()).st_mtime
            stream.seek(start)
            first = stream.readline()
            if not first.startswith(b'{"event": "run"') or not first.endswith(b"\n"):
                return None
            story = cls._begin(project, _json_decode(first.decode("utf-8")), last, modified)
            # Up to what the first pass saw: a running sweep's later lines
            # are past the time axis.
            story._read_events(stream, offset - start - len(first))
        return story

    @classmethod
    def _begin(cls, project, run, last, modified):
        """The story of ``run``, its time axis set: to its end line (the
        record's ``last``), to now while it runs, to the record's last
        write if its main process is gone without one."""
        end = None
        if last.startswith(b'{"event": "end"'):
            end = _json_decode(last.decode("utf-8"))
            if end.get("run") != run.get("run"):
                end = None
        if end is not None:
            return cls(project, run, end, "stopped" if end.get("stopped") else "finished",
                       end["time"])
        here = run.get("host") == os.uname().nodename
        if here and run.get("pid") == os.getpid():
            going = True   # the run itself, before its end line
        else:
            going = _RunLock(os.path.join(project.queue_dir, "run.lock")).held()
            if going is None:   # no locks here: the PID says, on its own host
                going = not here or _pid_alive(run.get("pid"))
        if going:
            return cls(project, run, None, "running", time.time())
        # mtime's granularity is coarser than the events' clock
        return cls(project, run, None, "gone", modified + 0.05)

    def _read_events(self, stream, size):
        finished = self.end is not None
        for line in stream:
            size -= len(line)
            if size < 0 or not line.endswith(b"\n"):
                break   # past the first pass, or torn: its writer is mid-line, or died there
            if line.startswith(_HAND_LINE) or finished and line.startswith(
                    (_START_LINE, _BACK_LINE)):
                continue
            try:
                self._take(_json_scan(line.decode("utf-8"), 0)[0])
            except (ValueError, AttributeError, TypeError, KeyError, IndexError,
                    StopIteration):
                continue   # not an event of this schema
        for attempt in self._running.values():   # still running: drawn to now
            self._tally(attempt)

    def _take(self, event):
        kind = event["event"]
        if kind == "task":
            self._ended(event)
        elif kind == "start":
            self._running[event["id"]] = _Attempt(event["id"], event["worker"],
                                                  event["time"], event.get("attempt", 1))
        elif kind == "back":
            self._running.pop(event["id"], None)
        elif kind == "worker":
            self._worker(event)
        elif kind == "sample":
            self._sampled(event["time"], event["workers"])

    def _ended(self, event):
        task_id, seconds, now = event["id"], event.get("seconds"), event["time"]
        running = self._running.pop(task_id, None)
        # The worker's own clock says how long it ran; "start" is when this
        # process sent it (or read the answer before it).
        begin = now - seconds if seconds is not None else \
            running.begin if running is not None else now
        attempt = _Attempt(task_id, event.get("worker"), begin, event.get("attempt", 1))
        attempt.end, attempt.seconds = now, seconds
        attempt.load, attempt.status = event.get("load") or 0.0, event["status"]
        attempt.reason, attempt.converted = event.get("reason") or "", event.get("converted", ())
        self._tally(attempt)

    def _worker(self, event):
        state = event["state"]
        if state == "start":
            self.lanes.setdefault(event["worker"], _Lane(event))
            return
        lane = self._lane(event["worker"])
        if state == "ready":
            lane.ready, lane.pid, lane.host = event["time"], event.get("pid"), event.get("host")
        elif state == "remove":
            lane.removed = event["time"]
        elif state == "stop":
            lane.stopped = event["time"]
        elif state == "exit":
            lane.exited, lane.cause, lane.code = event["time"], event.get("cause"), \
                event.get("code")

    def _sampled(self, when, figures):
        column = int((when - self.t0) * self.scale)
        for worker, values in figures.items():
            for key, series in self.series.items():
                value = values.get(key)
                if value is not None:
                    points = series.setdefault(int(worker), collections.OrderedDict())
                    points[column] = max(points.get(column, value), value)

    def _lane(self, worker):
        """The lane of ``worker`` (one the record's start line missed begins with the run)."""
        lane = self.lanes.get(worker)
        if lane is None:
            lane = self.lanes[worker] = _Lane({"worker": worker, "time": self.t0})
        return lane

    # -- tallying -----------------------------------------------------------

    def nicknames(self, task_id):
        """The task's values, by the folder names its ID is made of."""
        if self._nicknames is not None:
            return self._nicknames.get(task_id, ())
        parts = task_id.split("/")
        return parts if len(parts) == len(self.names) else ()

    def folder(self, task_id):
        return os.path.join(self.project.output_dir, task_id)

    def _read_nicknames(self):
        """{task ID: nicknames} from all_tasks.json (one task per line)."""
        found = {}
        try:
            stream = open(os.path.join(self.project.queue_dir, "all_tasks.json"), "rb")
        except FileNotFoundError:
            return found
        with stream:
            for line in stream:
                if line.startswith(b"{"):   # not "[" or "]"
                    try:
                        entry = _json_scan(line.decode("utf-8"), 0)[0]
                        found[entry["task_id"]] = [declared.get("nickname") for declared
                                                   in entry["variables"].values()]
                    except (ValueError, KeyError, AttributeError, StopIteration):
                        continue
        return found

    def colour(self, values):
        """The colour of a top-level value (given one in order of appearance)."""
        if not values:
            return "#999"
        colour = self.colours.get(values[0])
        if colour is None:
            colour = self.colours[values[0]] = REPORT_PALETTE[
                len(self.colours) % len(REPORT_PALETTE)]
        return colour

    def _tally(self, attempt):
        values = self.nicknames(attempt.task_id)
        failed = attempt.failed
        attempt.begin = min(attempt.begin, self.t1)
        end = attempt.end if attempt.end is not None else self.t1
        seconds = max(0.0, end - attempt.begin)
        if attempt.worker is not None:
            lane = self._lane(attempt.worker)
            lane.tasks += 1
            lane.busy += seconds
            if seconds * self.scale >= REPORT_MIN_BAR or attempt.end is None:
                self.bars.append(attempt)
            else:
                key = attempt.worker, int((attempt.begin - self.t0) * self.scale
                                          // REPORT_MIN_BAR)
                block = self.bins.get(key)
                if block is None:
                    block = self.bins[key] = _Bin()
                block.count += 1
                block.alone = attempt if block.count == 1 else None
                block.busy += seconds
                block.failed += failed
                block.colours[self.colour(values)] += seconds
        if attempt.end is None:
            self.outcomes["running"] += 1
            return
        self.outcomes[attempt.status] += 1
        seconds = attempt.seconds or 0.0
        self.seconds += seconds
        self.load += attempt.load
        for level in attempt.converted:
            self.calls[level] += 1
        for level, prefix in self.prefixes.items():
            if len(values) > level:
                prefix.add(tuple(values[:level + 1]))
        for stats, value in zip(self.by_value, values):
            stat = stats.get(value)
            if stat is None:
                stat = stats[value] = _ValueStat()
            stat.count += 1
            stat.seconds += seconds
            stat.load += attempt.load
            stat.failed += failed and attempt.status != "interrupted"   # not the value's doing
        if failed or attempt.task_id in self.failures:
            self._tally_failure(attempt)

    def _tally_failure(self, attempt):
        attempts = self.failures.get(attempt.task_id)
        if attempts is not None:
            attempts.append(attempt)
        elif len(self.failures) < REPORT_ROWS:
            self.failures[attempt.task_id] = [attempt]
        else:
            self.failures_left_out += 1

    def most_workers_at_once(self):
        """The most workers that ran tasks at the same time."""
        changes = []
        for lane in self.lanes.values():
            if lane.tasks:
                changes += [(lane.ready or lane.started, 1),
                            (lane.exited if lane.exited is not None else self.t1, -1)]
        most = now = 0
        for _, change in sorted(changes):   # an exit before a start at the same time
            now += change
            most = max(most, now)
        return most


def report(directory=".", path=None):
    """Write the HTML report of the last run of the project in ``directory``
    to ``path`` (default: threadward/report.html) and return its path.
    Reads only files, and works while a run goes on."""
    project = _Project(directory)
    project.check_folder()
    story = _RunStory.read(project)
    if story is None:
        raise ThreadwardError("%s records no run yet; `threadward run` first" % _display_path(
            os.path.join(project.queue_dir, EVENTS_FILE)))
    path = os.path.abspath(path or project.path(REPORT_FILE))
    try:
        _atomic_write(path, _ReportPage(story, os.path.dirname(path)).html())
    except OSError as exc:
        raise ThreadwardError("cannot write %s: %s" % (_display_path(path),
                                                       exc.strerror or exc))
    return path


def _seconds_text(seconds):
    if seconds is None:
        return "?"
    if seconds < 60:
        return "%.3g s" % seconds if seconds < 10 else "%.1f s" % seconds
    return _format_duration(seconds)


def _setting_text(name, value):
    """A setting as the user writes it in Python (the record holds JSON)."""
    if name == "SIGTERM_GRACE" and value == "inf":
        return 'float("inf")'
    return repr(value)


def _offset_text(seconds, step):
    """``seconds`` with as many decimals as tell two points ``step`` apart."""
    if step >= 1:
        return _seconds_text(seconds)
    text = "%.*f" % (math.ceil(-math.log10(step)), seconds)
    if seconds < 60:
        return text + " s"
    whole, decimals = text.split(".")
    return "%s.%s" % (_format_duration(int(whole)), decimals)


def _nice_step(span, count):
    """A round step (1, 2 or 5 x 10^n) that cuts ``span`` into about ``count``."""
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(step * power for step in (1, 2, 5, 10) if step * power >= raw)


class _ReportPage:
    """The HTML of a _RunStory: each section a method returning its markup."""

    STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;
border-bottom:1px solid #ddd}h3{font-size:14px;margin:14px 0 2px}
table{border-collapse:collapse;margin:6px 0}
td,th{padding:2px 12px 2px 0;text-align:left;vertical-align:top}
th{font-weight:600;border-bottom:1px solid #ccc}td.n,th.n{text-align:right}
.muted{color:#777}.bad{color:#b71c1c}.bar{display:inline-block;height:10px;
background:#4e79a7;vertical-align:middle}code{font-size:13px}
svg text{font:11px system-ui,sans-serif;fill:#444}.legend span{display:inline-block;
margin-right:14px}.swatch{display:inline-block;width:11px;height:11px;margin-right:4px;
vertical-align:-1px}"""
    LEFT = 78   # px left of a chart's time axis, for its labels

    def __init__(self, story, report_dir):
        import html
        self.escape = html.escape
        self.story, self.report_dir = story, report_dir

    def html(self):
        story = self.story
        sections = [self.header(), self.timeline(), self.loads(), self.by_value(),
                    self.resources(), self.failures()]
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<title>threadward report: %s</title><style>%s</style></head><body>\n%s\n"
                "<p class=\"muted\">written by threadward %s at %s from %s</p>"
                "</body></html>\n" % (
                    self.escape(os.path.basename(story.project.directory)), self.STYLE,
                    "\n".join(sections), __version__, self._clock(time.time()),
                    self.escape(os.path.join(PROJECT_SUBDIR, "task_queue", EVENTS_FILE))))

    # -- pieces -------------------------------------------------------------

    @staticmethod
    def _clock(when):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))

    def _x(self, when):
        return (when - self.story.t0) * self.story.scale

    def _table(self, head, rows, numeric=(), more=0, what="rows"):
        """A table of ``rows`` (markup, escaped); ``numeric``: right-aligned columns."""
        def cells(tag, values):
            return "".join("<%s%s>%s</%s>" % (tag, ' class="n"' if i in numeric else "", v, tag)
                           for i, v in enumerate(values))
        text = "<table><tr>%s</tr>%s</table>" % (
            cells("th", head), "".join("<tr>%s</tr>" % cells("td", row) for row in rows))
        if more:
            text += "<p class=\"muted\">and %d more %s</p>" % (more, what)
        return text

    def _describe(self, attempt):
        """The hover text of an attempt."""
        story = self.story
        values = story.nicknames(attempt.task_id)
        lines = [attempt.task_id, "  ".join("%s=%s" % pair for pair in zip(story.names, values)),
                 "%s on worker %s, attempt %d: %s" % (
                     _seconds_text(attempt.seconds if attempt.seconds is not None
                                   else story.t1 - attempt.begin),
                     attempt.worker, attempt.attempt, attempt.status)]
        if attempt.load:
            lines.append("loading %s (%s)" % (_seconds_text(attempt.load), ", ".join(
                story.names[level] for level in attempt.converted if level < len(story.names))))
        if attempt.reason:
            lines.append(attempt.reason)
        return self.escape("\n".join(line for line in lines if line))

    # -- sections -----------------------------------------------------------

    def header(self):
        story, run = self.story, self.story.run
        outcomes = story.outcomes
        succeeded, interrupted = outcomes["succeeded"], outcomes["interrupted"]
        failed = outcomes["failed"] + interrupted
        not_run = story.end["not_run"] if story.end else \
            run.get("tasks", 0) - succeeded - failed - outcomes["running"]
        state = {"finished": "finished",
                 "stopped": "stopped (%s)" % (story.end or {}).get("stopped"),
                 "running": "running; this page shows it as of %s" % self._clock(story.t1),
                 "gone": "ended without its last line: the main process (%s) is gone"
                         % run.get("pid")}[story.state]
        counts = ["<b>%d succeeded</b>" % succeeded,
                  "<b class=\"bad\">%d failed</b>%s" % (
                      failed, " (%d interrupted: they run again)" % interrupted
                      if interrupted else "") if failed else "0 failed",
                  "%d %s" % (not_run, "to run" if story.state == "running" else "not run")]
        if outcomes["running"]:
            counts.append("%d %s" % (outcomes["running"], "running" if story.state == "running"
                                     else "never recorded as ended"))
        if outcomes["retrying"]:
            counts.append(_plural(outcomes["retrying"], "failed attempt") + " run again")
        if run.get("skipped"):
            counts.append("%d skipped (succeeded before)" % run["skipped"])
        lines = ["<h1>threadward report: %s</h1>" % self.escape(story.project.directory),
                 "<p>run <code>%s</code> on %s, started %s: %s; wall time %s</p>" % (
                     self.escape(str(run.get("run"))), self.escape(str(run.get("host"))),
                     self._clock(story.t0), self.escape(state),
                     _format_duration(story.t1 - story.t0)),
                 "<p>%s, of %d tasks in this run</p>" % (", ".join(counts), run.get("tasks", 0))]
        rows = []
        unended = {"running": "running", "gone": "lost with the run"}.get(story.state,
                                                                          "not recorded")
        lanes = sorted(story.lanes.values(), key=lambda lane: lane.worker)
        for lane in lanes[:REPORT_ROWS]:
            # busy: of the time it could take tasks, from ready to told to stop
            up = (lane.stopped or lane.exited or story.t1) - (lane.ready or lane.started)
            rows.append([str(lane.worker), ",".join(map(str, lane.gpus)) or "CPU",
                         self.escape(str(lane.host or run.get("host"))), str(lane.pid or ""),
                         self.escape(self._why(lane)), "+" + _seconds_text(lane.started -
                                                                           story.t0),
                         str(lane.tasks), "%d %%" % min(100, 100 * lane.busy / up)
                         if up > 0 else "", self.escape(lane.cause or unended)])
        lines.append(self._table(["worker", "GPUs", "host", "pid", "started as", "at",
                                  "attempts", "busy", "ended"], rows, numeric=(5, 6, 7),
                                 more=max(0, len(lanes) - REPORT_ROWS), what="workers"))
        settings = run.get("settings") or {}
        lines.append("<details><summary>settings (%d)</summary>%s</details>" % (
            len(settings), self._table(["setting", "value"], [
                [name, "<code>%s</code>" % self.escape(_setting_text(name, value))]
                for name, value in settings.items()])))
        return "\n".join(lines)

    @staticmethod
    def _slot(lane):
        return lane.slot if lane.slot is not None else "worker %s" % lane.worker

    @staticmethod
    def _why(lane):
        return lane.why + (" of worker %s" % lane.replaces if lane.replaces is not None else "")

    def timeline(self):
        """A row per worker slot: a worker and those that replaced it, each
        drawn from its start to its exit (a sweep of many crashes stays a
        few rows)."""
        story = self.story
        lanes = sorted(story.lanes)
        slots = []
        for worker in lanes:
            slot = self._slot(story.lanes[worker])
            if slot not in slots:
                slots.append(slot)
        top = 18
        height = top + REPORT_LANE * len(slots) + 24
        row = {worker: top + REPORT_LANE * slots.index(self._slot(story.lanes[worker]))
               for worker in lanes}
        parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
                 'class="timeline"><defs><pattern id="running" width="6" height="6" '
                 'patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
                 '<rect width="3" height="6" fill="#fff" fill-opacity=".7"/></pattern></defs>'
                 '<g transform="translate(%d,0)">' % (self.LEFT + REPORT_WIDTH + 20, height,
                                                      self.LEFT)]
        parts += self._axis(top, height - 20)
        for slot in slots:
            workers = [w for w in lanes if self._slot(story.lanes[w]) == slot]
            parts.append('<text x="-8" y="%d" text-anchor="end">worker %s<title>%s</title>'
                         '</text>' % (row[workers[0]] + REPORT_LANE - 8, workers[-1] if len(
                             workers) == 1 else "%s+" % workers[0], self.escape(
                             "workers %s, one after another" % ", ".join(map(str, workers))
                             if len(workers) > 1 else "worker %s" % workers[0])))
        for worker in lanes:
            parts += self._lane_background(story.lanes[worker], row[worker])
        parts += [self._bar(attempt, row[attempt.worker]) for attempt in story.bars]
        parts += [self._bin(block, number, row[worker])
                  for (worker, number), block in sorted(story.bins.items())]
        for worker in lanes:
            parts += self._markers(story.lanes[worker], row[worker])
        parts.append("</g></svg>")
        binned = sum(block.count for block in story.bins.values())
        note = ("%d attempts drawn one by one; %d shorter than %s (%d px here) are drawn "
                "together: a block per %d px of a worker's lane, coloured by the "
                "top-level value that took most of its time, paler the less of it the "
                "worker was busy, red from the top by the share that failed; hover for "
                "their count." % (
                    len(story.bars), binned, _seconds_text(REPORT_MIN_BAR / story.scale),
                    REPORT_MIN_BAR, REPORT_MIN_BAR)) if binned else \
            "%d attempts, each drawn one by one." % len(story.bars)
        return "<h2>Timeline</h2>\n%s\n%s\n<p class=\"muted\">%s Dark: loading (converters). " \
               "Hatched: still running. Grey: the worker is up and idle; a grey line: " \
               "starting, or shutting down (after_each_worker and the exit). A row is a worker " \
               "and those that replaced it. &#9650; worker started, &#9660; removed, " \
               "&#10005; exited; hover for why.</p>" % (self._legend(), "".join(parts), note)

    def _axis(self, top, bottom):
        span = self.story.t1 - self.story.t0
        step = _nice_step(span, 10)
        # as many decimals as the step has: 0.5 s, 1.0 s, 1.5 s
        label = "%%.%df s" % max(0, -math.floor(math.log10(step))) if span < 60 else None
        parts = []
        for number in range(int(span / step + 1e-9) + 1):
            tick = number * step
            x = tick * self.story.scale
            parts.append('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#eee"/>'
                         '<text x="%.1f" y="%d" text-anchor="middle">%s</text>' % (
                             x, x, top - 4, bottom, x, bottom + 14,
                             label % tick if label else _format_duration(tick)))
        return parts

    def _lane_background(self, lane, y):
        up = lane.ready or lane.started
        middle = y + REPORT_LANE // 2
        parts = []
        if lane.ready is not None:
            parts.append('<line class="starting" x1="%.1f" x2="%.1f" y1="%d" y2="%d" '
                         'stroke="#bbb" stroke-width="3"><title>worker %s starting: %s'
                         '</title></line>' % (
                             self._x(lane.started), self._x(up), middle, middle, lane.worker,
                             _seconds_text(up - lane.started)))
        end = lane.exited if lane.exited is not None else self.story.t1
        idle_until = min(lane.stopped, end) if lane.stopped is not None else end
        parts.append('<rect class="lane" x="%.1f" y="%d" width="%.1f" height="%d" '
                     'fill="#f0f0f0"/>' % (self._x(up), y + 2,
                                           max((idle_until - up) * self.story.scale, 0.5),
                                           REPORT_LANE - 4))
        if idle_until < end:
            parts.append('<line class="stopping" x1="%.1f" x2="%.1f" y1="%d" y2="%d" '
                         'stroke="#bbb" stroke-width="3"><title>worker %s shutting down: %s'
                         '</title></line>' % (self._x(idle_until), self._x(end), middle, middle,
                                              lane.worker, _seconds_text(end - idle_until)))
        return parts

    def _bar(self, attempt, y):
        story = self.story
        end = attempt.end if attempt.end is not None else story.t1
        x, width = self._x(attempt.begin), (end - attempt.begin) * story.scale
        fill = self._fill(attempt)
        inner = ""
        if attempt.load:
            inner = '<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#000" ' \
                    'fill-opacity=".35"/>' % (x, y + 3, min(attempt.load * story.scale, width),
                                              REPORT_LANE - 6)
        if attempt.end is None:
            inner += '<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="url(#running)"/>' % (
                x, y + 3, max(width, 0.5), REPORT_LANE - 6)
        return '<g class="task%s"><title>%s</title><rect x="%.1f" y="%d" width="%.1f" ' \
               'height="%d" fill="%s" stroke="#fff" stroke-width=".5"/>%s</g>' % (
                   " running" if attempt.end is None else "", self._describe(attempt), x, y + 3,
                   max(width, 0.5), REPORT_LANE - 6, fill, inner)

    def _fill(self, attempt):
        if attempt.status == "interrupted":
            return REPORT_INTERRUPTED
        return REPORT_FAILED if attempt.failed else \
            self.story.colour(self.story.nicknames(attempt.task_id))

    def _bin(self, block, number, y):
        width = REPORT_MIN_BAR / self.story.scale
        alone = block.alone
        title = self._describe(alone) if alone is not None else \
            "%d tasks between +%s and +%s, %d %% busy%s" % (
                block.count, _offset_text(number * width, width),
                _offset_text((number + 1) * width, width),
                min(100, round(100 * block.busy / width)),
                ", %d failed (see Failures)" % block.failed if block.failed else "")
        height = REPORT_LANE - 6
        # one attempt looks as its bar would: its outcome's colour
        fill = self._fill(alone) if alone is not None else block.colours.most_common(1)[0][0]
        text = '<rect class="tasks" x="%d" y="%d" width="%d" height="%d" fill="%s" ' \
               'fill-opacity="%.2f"><title>%s</title></rect>' % (
                   number * REPORT_MIN_BAR, y + 3, REPORT_MIN_BAR, height, fill,
                   0.35 + 0.65 * min(1.0, block.busy / width), title)
        if block.failed and alone is None:   # red from the top, as tall as the share that failed
            text += '<rect x="%d" y="%d" width="%d" height="%.1f" fill="%s"/>' % (
                number * REPORT_MIN_BAR, y + 3, REPORT_MIN_BAR,
                max(2.0, height * block.failed / block.count), REPORT_FAILED)
        return text

    def _markers(self, lane, y):
        marks = [(lane.started, "&#9650;", "#2e7d32",
                  "worker %s started (%s)" % (lane.worker, self._why(lane)))]
        if lane.removed is not None:
            marks.append((lane.removed, "&#9660;", "#555", "worker %s removed (the console's "
                          "remove: no new task)" % lane.worker))
        if lane.exited is not None:
            marks.append((lane.exited, "&#10005;", "#b71c1c" if lane.code else "#555",
                          "worker %s exited: %s" % (lane.worker, lane.cause)))
        return ['<text class="marker" x="%.1f" y="%d" text-anchor="middle" style="fill:%s">'
                '%s<title>%s</title></text>' % (self._x(when), y + 1, colour, glyph,
                                                self.escape(text))
                for when, glyph, colour, text in marks]

    def _legend(self):
        story = self.story
        shown = list(story.colours.items())[:len(REPORT_PALETTE)]
        items = ['<span><i class="swatch" style="background:%s"></i>%s</span>' % (
            colour, self.escape(str(value))) for value, colour in shown]
        if len(story.colours) > len(shown):
            items.append("<span class=\"muted\">(%d values: the colours repeat)</span>"
                         % len(story.colours))
        items.append('<span><i class="swatch" style="background:%s"></i>failed</span>'
                     % REPORT_FAILED)
        if self.story.outcomes["interrupted"]:
            items.append('<span><i class="swatch" style="background:%s"></i>interrupted '
                         '(runs again)</span>' % REPORT_INTERRUPTED)
        return '<p class="legend">%s: %s</p>' % (
            self.escape(story.names[0] if story.names else "top level"), "".join(items))

    def loads(self):
        story = self.story
        workers = story.most_workers_at_once()
        rows = []
        for level, name in enumerate(story.names):
            if level not in story.prefixes:
                rows.append([self.escape(name), "no converter", "", "", ""])
                continue
            prefixes = len(story.prefixes[level])
            bound = prefixes + workers - 1 if prefixes else 0
            calls = story.calls[level]
            rows.append([self.escape(name), str(calls), str(prefixes), str(bound),
                         "%.2f" % (calls / bound) if bound else ""])
        share = "%s of %s of task time went to loading (%d %%), %s to running" % (
            _seconds_text(story.load), _seconds_text(story.seconds),
            round(100 * story.load / story.seconds) if story.seconds else 0,
            _seconds_text(story.seconds - story.load))
        return ("<h2>Loads</h2>\n<p>%s.</p>\n%s\n<p class=\"muted\">Converter calls per level "
                "against P + W - 1, where P counts the distinct values of the level and "
                "those above it among the tasks run, and W = %d the most workers that ran "
                "them at once: the loads of W workers that cut a sweep of equal-length "
                "tasks into contiguous runs, which no schedule beats by more than W - 1. "
                "A run of few tasks, or one stopped early, may need fewer. A load that "
                "failed counts as a call.</p>" % (
                    share, self._table(["variable", "converter calls", "P", "P + W - 1",
                                        "calls / bound"], rows, numeric=(1, 2, 3, 4)),
                    workers))

    def by_value(self):
        story = self.story
        parts = ["<h2>Task time by variable value</h2>",
                 "<p class=\"muted\">Every attempt of this run that ended, by the value it "
                 "ran with, in the order the first of each ended; seconds include "
                 "loading; an interrupted attempt is not a failed one.</p>"]
        for name, stats in zip(story.names, story.by_value):
            if not stats:
                continue
            shown = list(stats.items())
            more = 0
            if len(shown) > REPORT_VALUES:   # the slowest
                shown.sort(key=lambda item: -item[1].seconds / item[1].count)
                more, shown = len(shown) - REPORT_VALUES, shown[:REPORT_VALUES]
            slowest = max(stat.seconds / stat.count for _, stat in shown) or 1.0
            rows = [[self.escape(str(value)), str(stat.count),
                     _seconds_text(stat.seconds / stat.count),
                     '<i class="bar" style="width:%dpx"></i>' % round(
                         160 * stat.seconds / stat.count / slowest),
                     _seconds_text(stat.load / stat.count), _seconds_text(stat.seconds),
                     '<span class="bad">%d</span>' % stat.failed if stat.failed else "0"]
                    for value, stat in shown]
            parts.append("<h3>%s</h3>%s" % (self.escape(name), self._table(
                [self.escape(name), "attempts", "mean", "", "mean load", "total",
                 "failed attempts"],
                rows, numeric=(1, 2, 4, 5, 6), more=more,
                what="values (the %d slowest are shown)" % REPORT_VALUES)))
        return "\n".join(parts)

    def resources(self):
        series = self.story.series
        workers = sorted({worker for lines in series.values() for worker in lines})
        parts = ["<h2>Resources</h2>"]
        if not workers:
            parts.append("<p class=\"muted\">No readings: one is taken every %g s while "
                         "the run goes on, with psutil for CPU and RAM.</p>" % STATUS_INTERVAL)
            return "\n".join(parts)
        palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                   "#7f7f7f", "#bcbd22", "#17becf")
        colour = {w: palette[n % len(palette)] for n, w in enumerate(workers)}
        parts.append('<p class="legend">%s</p>' % "".join(
            '<span><i class="swatch" style="background:%s"></i>worker %d</span>' % (
                colour[w], w) for w in workers))
        for key, title, form in (("cpu", "CPU (% of one core)", lambda v: "%d %%" % v),
                                 ("rss", "RAM (RSS of the worker and its children)",
                                  _format_bytes),
                                 ("gpu", "GPU memory", _format_bytes)):
            parts.append(self._chart(series[key], workers, colour, title, form))
        return "\n".join(parts)

    def _chart(self, series, workers, colour, title, form):
        """A line per worker; of several samples in a pixel column, the largest."""
        if not series:
            return "<h3>%s</h3><p class=\"muted\">no readings</p>" % title
        top = max(max(points.values()) for points in series.values()) or 1
        height = 110
        lines = []
        for worker in workers:
            points = [(x, height - height * v / top, v) for x, v in series.get(worker, {}).items()]
            lines.append('<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s">'
                         '<title>worker %d</title></polyline>' % (
                             colour[worker], " ".join("%d,%.1f" % point[:2] for point in points),
                             worker))
            if len(points) <= REPORT_DOTS:   # a line of few points: each one shown
                lines += ['<circle cx="%d" cy="%.1f" r="2.5" fill="%s"><title>worker %d: %s'
                          '</title></circle>' % (x, y, colour[worker], worker, form(v))
                          for x, y, v in points]
        return ('<h3>%s</h3><svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d">'
                '<g transform="translate(%d,6)"><line x1="0" x2="%d" y1="%d" y2="%d" '
                'stroke="#ccc"/><text x="-8" y="8" text-anchor="end">%s</text>'
                '<text x="-8" y="%d" text-anchor="end">0</text>%s%s</g></svg>' % (
                    title, self.LEFT + REPORT_WIDTH + 20, height + 30, self.LEFT, REPORT_WIDTH,
                    height, height, form(top), height, "".join(self._axis(0, height)),
                    "".join(lines)))

    def failures(self):
        story = self.story
        parts = ["<h2>Failures</h2>"]
        if not story.failures:
            parts.append("<p>No attempt failed.</p>")
            return "\n".join(parts)
        import urllib.parse
        rows = []
        # the tasks that failed in the end first, then those a retry saved
        listed = sorted(story.failures.items(), key=lambda item: not item[1][-1].failed)
        for task_id, attempts in listed:
            final = attempts[-1]
            reason = next(a.reason for a in reversed(attempts) if a.failed)
            outcome = {"succeeded": "succeeded on attempt %d" % final.attempt,
                       "running": "running attempt %d" % final.attempt,
                       "interrupted": "interrupted (runs again)",
                       "retrying": "retrying" if story.state == "running" else
                                   "not run again (the run stopped)"}.get(final.status,
                                                                          final.status)
            log = os.path.relpath(os.path.join(story.folder(task_id), Task.LOG_NAME),
                                  self.report_dir)
            rows.append(['<a href="%s">%s</a>' % (self.escape(urllib.parse.quote(log)),
                                                  self.escape(task_id)),
                         '<span class="bad">%s</span>' % outcome if final.failed else outcome,
                         str(final.attempt), self.escape(reason)])
        parts.append(self._table(["task (its task.log)", "outcome", "attempts", "reason"],
                                 rows, numeric=(2,), more=story.failures_left_out,
                                 what="failed attempts of other tasks (failed_tasks.txt "
                                      "lists the tasks that failed)"))
        return "\n".join(parts)


###############################################################################
# Worker (the parent's handle on one subprocess) ##############################
###############################################################################

class Worker:
    """The main process's handle on one worker subprocess, and its life::

        STARTING --ready--> IDLE --hand--> BUSY --answered--> IDLE or BUSY
        IDLE, BUSY --shut_down, SIGTERM--> STOPPING;  any --exited--> EXITED

    It holds a queue of tasks sent and not answered: the first runs, one
    more may be queued behind it.  ``end_cause`` says why it ends when that
    is not a plain SHUT_DOWN: threadward ended it (TIMEOUT, INTERRUPTED), or
    a SIGTERM came from elsewhere (OUTSIDE).  ``retiring`` (`remove N`): it
    takes no new task and shuts down."""

    STARTING, IDLE, BUSY, STOPPING, EXITED = "starting", "idle", "busy", "stopping", "exited"
    TIMEOUT, INTERRUPTED, OUTSIDE = "timeout", "interrupted", "a SIGTERM from outside"
    KILL = "kill"   # the other deadline action: SIGKILL what is left

    def __init__(self, worker_id, slot, place, task_timeout=None, on_begin=None):
        self.worker_id = worker_id
        self.slot = slot              # index of its _Slot; a replacement reuses it
        self.host = place.host        # None: this machine
        self.gpus = place.gpus        # tuple of CUDA_VISIBLE_DEVICES entries
        self.task_timeout = task_timeout
        self.remote_pid = None        # as the worker reports it (not the launcher's)
        self.reports_stats = False    # True: the worker sends its own figures
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.state = self.STARTING
        self.queue = collections.deque()   # tasks sent and not answered; the first runs
        self.cancelling = set()       # IDs of queued tasks a CANCEL line is taking back
        self.last_seconds = None      # how long its last task took (the worker's clock)
        self.retiring = False         # `remove N`: no new task, then SHUT_DOWN
        self.end_cause = None         # TIMEOUT, INTERRUPTED, OUTSIDE
        self.overdue = None           # the task TASK_TIMEOUT ended it for
        self.fatal = None             # start-up traceback sent by the worker
        self.process = None
        self.pid = None
        self.returncode = None
        self.deadline = None          # (monotonic time, TIMEOUT or KILL, task)
        self.stats = {}               # monitoring: current and max figures
        self._on_begin = on_begin     # called with (worker, task) as each task begins
        self._buffer = _LineBuffer()
        self._stderr_buffer = _LineBuffer()

    def __repr__(self):
        return "Worker(%d, %s, pid=%s)" % (self.worker_id, self.state, self.pid)

    @property
    def task(self):
        """The task it is running (the oldest one sent and not answered)."""
        return self.queue[0] if self.queue else None

    @property
    def ended_by_us(self):
        return self.end_cause in (self.TIMEOUT, self.INTERRUPTED)

    # -- transitions --------------------------------------------------------

    def ready(self, message, placed_elsewhere):
        self.state = self.IDLE
        self.remote_pid = message.get("pid")
        if placed_elsewhere and not self.host:
            self.host = message.get("host")
        if not self.gpus and message.get("gpus"):   # Slurm chose them
            self.gpus = tuple(message["gpus"].split(","))

    def hand(self, task, line):
        """Send ``task`` (its protocol ``line``): it runs now, or queued
        behind the running one.  If the worker is gone the send fails, and
        its exit records the task."""
        self.queue.append(task)
        if len(self.queue) == 1:
            self._begin()
        self.send(line)

    def _begin(self):
        """The first task of the queue runs from now (the answer to the one
        before has just come, or the worker was idle)."""
        task = self.queue[0]
        task.started = time.monotonic()
        self.state = self.BUSY
        self.deadline = None
        if self.task_timeout:
            self.deadline = (task.started + self.task_timeout, self.TIMEOUT, task)
        if self._on_begin is not None:
            self._on_begin(self, task)

    def answered(self):
        """The running task has its result: the next queued one starts, or
        the worker is idle.  Returns the answered task."""
        task = self.queue.popleft()
        self.cancelling.discard(task.task_id)
        if self.queue:
            self._begin()
        else:
            self.state = self.IDLE
            self.deadline = None
        return task

    def cancelled(self, task_id):
        """The worker gave back the queued task ``task_id`` unstarted (the
        answer may come before the result of the task ahead of it).
        Returns that task, or None."""
        for position, task in enumerate(self.queue):
            if task.task_id == task_id:
                break
        else:
            return None
        if position == 0:
            self.answered()
        else:
            del self.queue[position]
            self.cancelling.discard(task_id)
        self.last_seconds = None   # not queued here again before its next result
        return task

    def cancel_queued(self, with_running=False):
        """Take back what the worker has not started: the tasks queued behind
        the running one and, ``with_running``, that one too in case its start
        is still ahead (its predecessor's result has just come).  A CANCEL
        line: each comes back "cancelled", or as a result if it had started.
        True while an answer is due for a task that was queued behind."""
        queued = {task.task_id for task in list(self.queue)[1:]}
        if queued - self.cancelling or (with_running and self.queue):
            self.cancelling |= queued
            self.send(_encode_line(CANCEL))
        return bool(self.cancelling)

    def take_back(self, keep_running=True):
        """The tasks it will never start (it is gone, or going), newest first."""
        tasks = []
        while len(self.queue) > (1 if keep_running else 0):
            tasks.append(self.queue.pop())
        self.cancelling.clear()
        return tasks

    def may_queue_ahead(self):
        """Whether its next task should be sent before it answers this one:
        its last task was short, and nothing is being taken back from it."""
        return (len(self.queue) == 1 and not self.cancelling and not self.retiring
                and not self.process.stdout.closed   # it is gone, not yet reaped
                and self.last_seconds is not None and self.last_seconds < QUEUE_AHEAD_BELOW)

    def shut_down(self):
        self.state = self.STOPPING
        self.send(_encode_line(SHUT_DOWN))

    def stops_itself(self):
        """A SIGTERM reached it: it starts nothing more and exits."""
        self.state = self.STOPPING
        if self.end_cause is None:
            self.end_cause = self.OUTSIDE

    def end(self, cause):
        """SIGTERM its process group now (TIMEOUT or INTERRUPTED), SIGKILL after KILL_WAIT."""
        self.end_cause = cause
        self.signal_group(signal.SIGTERM)
        self.deadline = (time.monotonic() + KILL_WAIT, self.KILL, None)

    def kill(self):
        if self.poll() is None:
            # Its descendants first: those in sessions of their own are not in its group.
            _kill_descendants(self.pid)
        self.signal_group(signal.SIGKILL)
        if self.process.stdout.closed and self.poll() is None:
            # SIGKILL cannot be ignored; the reap after SIGCHLD finishes the job.
            self.deadline = (time.monotonic() + KILL_WAIT, self.KILL, None)

    def kill_now(self):
        """SIGKILL its group and wait (a bounded time) for it: the way out
        after an exception, or with workers still alive."""
        self.signal_group(signal.SIGKILL)
        self.close_pipes()
        try:
            self.process.wait(KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass

    def exited(self):
        """Its pipe has closed and its process is gone; returns the state it was in."""
        previous, self.state, self.deadline = self.state, self.EXITED, None
        return previous

    def lost_task_reason(self):
        """Why the task it died holding failed."""
        return self.end_cause if self.ended_by_us else self.exit_reason()

    # -- its process and pipes ----------------------------------------------

    def launch(self, launcher, project):
        """Start the worker (or its launcher) in a process group of its own, so
        that Ctrl-C in the terminal reaches only the main process.  False
        (and ``fatal`` says why) if it could not be started."""
        argv, env = launcher.command(self, project.directory)
        # A launcher's own messages (srun, ssh) go through us: shown with the
        # worker's number, and kept to explain a worker that fails to start.
        try:
            os.makedirs(project.worker_log_dir, exist_ok=True)
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if launcher.indirect else None,
                cwd=project.directory, env=env, start_new_session=True)
        except OSError as exc:   # too many open files, a launcher gone since start-up
            self.fatal = "could not run %s: %s" % (argv[0], exc)
            return False
        self.pid = self.process.pid
        self.reports_stats = launcher.indirect   # it sends its own figures
        return True

    def watch(self, selector, on_output, on_stderr):
        """Select on its stdout (the protocol) and, behind a launcher, its stderr."""
        selector.register(self.fileno(), selectors.EVENT_READ, on_output)
        if self.process.stderr is not None:
            os.set_blocking(self.process.stderr.fileno(), False)
            selector.register(self.process.stderr.fileno(), selectors.EVENT_READ, on_stderr)

    def stderr_lines(self, selector):
        """The launcher's stderr lines now readable; at its end the pipe is
        no longer selected and is closed."""
        stderr = self.process.stderr
        if stderr is None or stderr.closed:
            return []   # a stale event from the same select(), after the pipes closed
        lines = self.read_stderr()
        if lines is None:
            selector.unregister(stderr.fileno())
            stderr.close()
            return []
        return lines

    def unwatch(self, selector):
        """Its stdout has ended: its pipes are closed, and a process still
        alive is killed after KILL_WAIT.  Returns what the launcher said as
        it ended."""
        selector.unregister(self.fileno())
        last = self.stderr_lines(selector)
        stderr = self.process.stderr
        if stderr is not None and not stderr.closed:
            selector.unregister(stderr.fileno())
        self.close_pipes()
        if self.poll() is None:
            self.deadline = (time.monotonic() + KILL_WAIT, self.KILL, None)
        return last

    def read_stderr(self):
        """Complete lines of the launcher's stderr now readable, as text (the
        last STDERR_TAIL_LINES kept to explain a failed start); None at its end."""
        try:
            data = os.read(self.process.stderr.fileno(), READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            tail = self._stderr_buffer.close()
            lines = [tail] if tail else None
        else:
            lines = self._stderr_buffer.feed(data)
        if lines is None:
            return None
        texts = [line.decode("utf-8", "replace").rstrip() for line in lines]
        self.stderr_tail.extend(texts)
        return texts

    def where(self):
        """'pid' for a local worker, 'pid@host' for one the launcher placed elsewhere."""
        if self.remote_pid is None or (self.remote_pid == self.pid and not self.host):
            return str(self.pid)
        return "%s@%s" % (self.remote_pid, self.host or "?")

    def fileno(self):
        return self.process.stdout.fileno()

    def read_lines(self):
        """Complete lines now readable, and whether the pipe has reached its end."""
        data = os.read(self.fileno(), READ_SIZE)
        if not data:
            return [], True
        return self._buffer.feed(data), False

    def send(self, data):
        """Write one protocol line; False if the worker is gone."""
        try:
            _write_all(self.process.stdin.fileno(), data)
            return True
        except (OSError, ValueError):   # a broken pipe, or one we closed at its end
            return False

    def close_pipes(self):
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def poll(self):
        if self.returncode is None and self.process.poll() is not None:
            self.returncode = self.process.returncode
        return self.returncode

    def signal_group(self, sig):
        if self.poll() is None:
            _kill_group(self.pid, sig)

    def exit_reason(self):
        code = self.returncode
        if code is None:
            return "worker %d stopped answering" % self.worker_id
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "signal %d" % -code
            return "worker %d was killed by %s" % (self.worker_id, name)
        return "worker %d exited with code %d" % (self.worker_id, code)


def _worker_table(workers, is_waiting):
    """The worker rows of `show`: fits 100 columns; remote workers show
    pid@host, and the state column gives up the room."""
    where_width = min(max([8] + [len(w.where()) for w in workers]), 20)
    state_width = 40 - where_width
    row = "%%3s  %%-%ds %%-7s %%-%ds %%11s  %%-13s %%s" % (where_width, state_width)
    remote = any(w.host for w in workers)
    lines = [row % ("ID", "PID@host" if remote else "PID", "GPUs", "state",
                    "CPU% now/max", "RAM now/max", "GPU mem now/max")]
    for worker in workers:
        state = worker.state
        if worker.task is not None:
            state = "busy %s %s" % (_format_duration(time.monotonic() - worker.task.started),
                                    _elide(worker.task.task_id, state_width - 13))
        elif worker.state == Worker.IDLE and is_waiting(worker.worker_id):
            state = "idle: no task worth a load"
        if worker.retiring:
            state = "removing; " + state
        stats = worker.stats
        lines.append(row % (
            worker.worker_id, worker.where()[:where_width], ",".join(worker.gpus)[:7] or "-",
            state[:state_width],
            "%s/%s" % tuple("?" if stats.get(name) is None else stats[name]
                            for name in ("cpu", "cpu_max")),
            "%s/%s" % (_format_bytes(stats.get("rss")), _format_bytes(stats.get("rss_max"))),
            "%s/%s" % (_format_bytes(stats.get("gpu")), _format_bytes(stats.get("gpu_max")))
            if worker.gpus else "-"))
    return lines


###############################################################################
# Console and signals #########################################################
###############################################################################

class _Signals:
    """The signals a run acts on.  Their handlers only record (Python's
    wakeup fd); the loop reads the fd with everything else and calls
    ``on_signal(signum)`` for each, SIGCHLD excepted (every wake-up is
    followed by a reap).  SIGQUIT, SIGUSR2 and SIGPIPE keep their defaults."""

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)

    def __init__(self, on_signal):
        self.on_signal = on_signal
        self._fds = None
        self._previous = {}

    def install(self, selector, extra=()):
        """Handle HANDLED and the ``extra`` signals (those the bar needs)."""
        if threading.current_thread() is not threading.main_thread():
            return   # only the main thread may: a library caller's thread runs without
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._fds = (read_fd, write_fd)
        self._previous["wakeup"] = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in self.HANDLED + tuple(extra):
            if sig in (signal.SIGHUP, signal.SIGTSTP) and signal.getsignal(sig) == signal.SIG_IGN:
                # `nohup threadward run`: the user asked to ride out a hang-up;
                # SIGTSTP ignored: a shell without job control started us.
                continue
            self._previous[sig] = signal.signal(sig, lambda signum, frame: None)
        selector.register(read_fd, selectors.EVENT_READ, self._on_readable)

    def take_back_sigint(self):
        """A KeyboardInterrupt reached the loop: Python's own SIGINT handler
        is back (a hook, or a library it called, installed it).  Ours is put
        back for the next Ctrl-C.  True if this one reaches the loop anyway:
        Python writes every signal's number to the wakeup fd whatever the
        handler, and ours is still set, so the loop reads it there (acting
        on the KeyboardInterrupt too would make one Ctrl-C count as two)."""
        if self._fds is None:
            return False
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        current = signal.set_wakeup_fd(self._fds[1], warn_on_full_buffer=False)
        if current != self._fds[1]:
            signal.set_wakeup_fd(current)   # someone else's now: theirs to keep
            return False
        return True

    def restore(self):
        if self._fds is None:
            return
        signal.set_wakeup_fd(self._previous.pop("wakeup"))
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds = None

    def _on_readable(self):
        try:
            data = os.read(self._fds[0], 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum != signal.SIGCHLD:
                self.on_signal(signum)


class _StatusBar:
    """The progress bar: the bottom row of a terminal, redrawn in place.

    The rows above it are made the terminal's scrolling region (DECSTBM), so
    whatever is written there -- our messages, `show`'s table, and what
    workers write to the terminal themselves in the CONSOLE_ONLY and
    LOG_FILE_AND_CONSOLE modes, which we never see -- scrolls without
    touching the bar, and nothing has to be cleared and redrawn around it.
    Lines scrolled off the top still go to the scrollback (xterm, VTE, tmux
    keep those of a region that starts at the top row).

    A redraw saves the cursor, writes the bottom row and restores the cursor
    (DECSC/DECRC), in one write(2), which a tty never interleaves with the
    writes of other processes or with its echo.  So what the user is typing,
    echoed by the terminal at the cursor in cooked mode, is neither moved
    nor overwritten; the console reads it as always, a line at a time.

    The region outlives us only if we are killed (SIGKILL); `reset` or
    `tput reset` gives the shell its whole screen back.  Ctrl-Z and resizes
    are handled (``close``/``open``, ``resized``); after a resize an old copy
    of the bar may be left among the lines above."""

    # SIGWINCH: the terminal was resized; SIGTSTP (Ctrl-Z): give the terminal
    # back before stopping; SIGCONT: draw again.
    SIGNALS = (signal.SIGWINCH, signal.SIGTSTP, signal.SIGCONT)

    @staticmethod
    def on_signal(bar, signum):
        """A resize, Ctrl-Z, and `fg` (or any SIGCONT); ``bar`` may be None."""
        if signum == signal.SIGTSTP:
            # The shell gets its whole screen back while we are stopped.
            # Workers run on: they are in process groups of their own.
            if bar is not None:
                bar.close()
            os.kill(os.getpid(), signal.SIGSTOP)   # returns after `fg` (SIGCONT)
        if bar is None:
            return
        if signum == signal.SIGWINCH:
            bar.resized()
        else:
            bar.resume()   # after Ctrl-Z, `fg`: the bar comes back below what the shell wrote
    MIN_ROWS, MIN_COLUMNS = 4, 30
    SAVE, RESTORE = "\x1b7", "\x1b8"

    def __init__(self, out, size, colour, on_gone):
        self._out = out
        self.rows, self.columns = size.lines, size.columns
        self.colour = colour
        self._on_gone = on_gone       # called if the terminal can no longer be written
        self.active = False           # between start and finish
        self.is_open = False          # holding the bottom row now
        self._shown = None            # the text on the bottom row now
        self._drawn_at = None

    @classmethod
    def for_terminal(cls, out, on_gone, environ=None):
        """A bar on ``out``, or None where plain lines are right: not a
        terminal (nohup, sbatch, a pipe, a file), TERM unset or "dumb" (an
        editor's shell buffer), or a terminal too small to give up a row."""
        environ = os.environ if environ is None else environ
        try:
            if not out.isatty():
                return None
            size = os.get_terminal_size(out.fileno())
        except (AttributeError, OSError, ValueError):
            return None
        if environ.get("TERM", "dumb") == "dumb" or not cls._fits(size.lines, size.columns):
            return None
        return cls(out, size, not environ.get("NO_COLOR"), on_gone)

    @classmethod
    def _fits(cls, rows, columns):
        return rows >= cls.MIN_ROWS and columns >= cls.MIN_COLUMNS

    @property
    def width(self):
        return self.columns - 1   # the last column left empty: no line wrap, ever

    def start(self):
        self.active = True
        self.open()

    def finish(self):
        self.active = False
        self.close()

    def resume(self):
        """After Ctrl-Z and `fg`, or a resize: take the bottom row again."""
        if self.active and not self.is_open and self._fits(self.rows, self.columns):
            self.open()

    def open(self):
        """Take the bottom row; the rows above become the scrolling region."""
        # Setting the region moves the cursor to the top left; the saved
        # position is restored, then moved up one row, which the newline made
        # free: the cursor is usually on the bottom row, which the bar takes.
        self._write("\n%s\x1b[1;%dr%s\x1b[A" % (self.SAVE, self.rows - 1, self.RESTORE))
        self.is_open = True
        self._shown = None

    def due(self, now):
        """Whether a redraw may come now (one every BAR_INTERVAL s at most)."""
        return self.is_open and (self._drawn_at is None or now - self._drawn_at >= BAR_INTERVAL)

    def draw(self, text, now):
        if text != self._shown:
            self._write("%s\x1b[%d;1H\x1b[2K%s%s" % (self.SAVE, self.rows, text, self.RESTORE))
            self._shown = text
            self._drawn_at = now

    def close(self, erase=True):
        """Give the whole screen back to scrolling; the bar's row is erased
        (not after a resize: that row may now hold other lines)."""
        if not self.is_open:
            return
        self.is_open = False
        erase_row = "\x1b[%d;1H\x1b[2K" % self.rows if erase else ""
        self._write("%s\x1b[r%s%s" % (self.SAVE, erase_row, self.RESTORE))

    def resized(self):
        """SIGWINCH: the region and the bar move to the new bottom row (a
        terminal too small for one gets the plain progress lines)."""
        try:
            size = os.get_terminal_size(self._out.fileno())
        except (OSError, ValueError):
            return
        if (size.lines, size.columns) == (self.rows, self.columns):
            return
        self.close(erase=False)
        self.rows, self.columns = size.lines, size.columns
        self.resume()

    def _write(self, text):
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):
            self.is_open = False
            self._on_gone()


class _Console:
    """Commands typed while a run goes on, one per line on stdin, turned into
    calls of the run's verbs (quit, show, add_worker, remove_worker).  End of
    input ends the console only: the run goes on (nohup, sbatch)."""

    def __init__(self, run, fd):
        self.run = run
        self.fd = fd
        self._buffer = _LineBuffer()

    def register(self, selector):
        """False if there is no usable stdin (closed, or a kind poll refuses)."""
        try:
            os.fstat(self.fd)
            selector.register(self.fd, selectors.EVENT_READ, lambda: self._on_readable(selector))
            return True
        except (OSError, ValueError):
            return False

    def _on_readable(self, selector):
        try:
            data = os.read(self.fd, 4096)
        except OSError:
            data = b""
        if not data:
            selector.unregister(self.fd)
            lines = [self._buffer.close()]   # `echo -n q |`: a last line without \n
        else:
            lines = self._buffer.feed(data)
        for line in lines:
            self.command(line.decode("utf-8", "replace").strip())

    def command(self, line):
        words = line.split()
        if not words:
            return
        verb = self._verbs.get(words[0].lower())
        if verb is None:
            self.run.say("unknown command %r; commands: show (s), quit (q), add (a), "
                         "remove N (r N), help (h)" % line)
            return
        try:
            verb(self, words[1:])
        except ThreadwardError as refused:
            self.run.say(str(refused))

    def _quit(self, arguments):
        running = self.run.quit()
        self.run.say("quit: no new tasks; waiting for %d running task(s), then teardown"
                     % running)

    def _show(self, arguments):
        self.run.say(self.run.show())

    def _add(self, arguments):
        worker = self.run.add_worker()
        if worker is not None:
            self.run.say("add: started worker %d%s" % (
                worker.worker_id, " on GPU %s" % ",".join(worker.gpus) if worker.gpus else ""))

    def _remove(self, arguments):
        try:
            worker_id = int(arguments[0])
        except (IndexError, ValueError):
            worker_id = arguments[0] if arguments else None
        worker = self.run.remove_worker(worker_id)
        self.run.say("remove: worker %d takes no new task%s" % (
            worker.worker_id, "; it finishes %s first" % worker.task.task_id
            if worker.task else ""))

    def _help(self, arguments):
        self.run.say(CONSOLE_HELP)

    _verbs = {"q": _quit, "quit": _quit, "s": _show, "show": _show, "a": _add, "add": _add,
              "r": _remove, "remove": _remove, "h": _help, "help": _help}


###############################################################################
# Threadward (the orchestrator) ###############################################
###############################################################################

class Threadward:
    """Runs a project: ``Threadward(directory).run()`` returns the exit code.

    ``Threadward(directory)`` runs the three files of directory/threadward/.
    ``Threadward(directory, task=f, variables=variable_set, **keywords)``
    runs a sweep declared in code and reads no file (directory/threadward/
    still gets the task queue and outputs): each setting of the files is a
    keyword of the same name in lower case (num_workers=4), each hook one of
    its own name (before_each_worker=setup).  ``fresh`` runs every task
    again, ``dry_run`` only prints the plan; console commands are read from
    ``stdin_fd`` (default: stdin, which for a sweep from code must be a
    terminal: a notebook has none); messages go to ``out`` (sys.stdout).

    The verbs of a running sweep (the console calls them): ``quit``,
    ``show``, ``add_worker``, ``remove_worker``.

    ``only`` and ``limit`` select what runs, as `run --only` and `--limit`
    do: ``only=["model=gpt2,bert", "seed=0"]``, ``limit=1``."""

    def __init__(self, directory=".", fresh=False, dry_run=False, stdin_fd=None, out=None,
                 only=(), limit=None, task=None, variables=None, **keywords):
        sweep = None
        if task is not None or variables is not None or keywords:
            sweep = _Sweep(task, variables, keywords)
        self.project = _Project(directory, sweep)
        if sweep is not None:
            self.project.load()   # every setting checked now, at the user's line
        if stdin_fd is None:
            stdin_fd = 0 if sweep is None or _is_terminal(0) else None
        self.fresh = fresh
        self.dry_run = dry_run
        self.only = list(only or ())
        self.limit = limit
        self._selection = None        # _Selection, when only or limit is given
        self._bar = None              # _StatusBar, when the output is a terminal
        self._stdin_fd = stdin_fd     # None: no console
        self._out = out or sys.stdout
        self.scheduler = None
        self._ledger = None
        self._selector = None
        self._signals = _Signals(self._on_signal)
        self._monitor = None
        self._launcher = None
        self._workers = {}            # worker id -> Worker (until reaped)
        self._hooks = {}              # on_task_success / on_task_failure, once looked up
        self._places = None           # _Places: where workers run
        self._gpu_uuids = {}          # CUDA_VISIBLE_DEVICES entry -> GPU UUID
        self._next_sample = None
        self._stopping = None         # None, or why no new tasks are handed out
        self._interrupting = False    # running tasks are being ended
        self._stop_deadline = None    # SIGTERM: when running tasks are ended
        self._hook_failed = False
        self.report_path = None       # report.html, once the run has written it
        self._own_children = set()    # processes of before_all_tasks: not orphans
        self._orphans = _Orphans()    # what workers that died left running

    # -- public entry -------------------------------------------------------

    def run(self):
        """Run the project; returns the exit code (ConfigError before anything runs)."""
        if _importing_for_worker:
            raise ConfigError("a worker importing this script (to find what it runs) came to "
                              "this run, which would start the sweep again in every worker; "
                              "put it under `if __name__ == \"__main__\":`", _caller_site())
        if self.project.sweep is not None:
            os.makedirs(self.project.config_dir, exist_ok=True)   # checked: now it may
        if not os.path.isdir(self.project.directory):
            raise ConfigError("%s is not a directory; give the project directory (the one "
                              "holding threadward/)" % self.project.directory)
        # The main-process hooks see what the workers see.
        leave = _enter_project(self.project)
        try:
            return self._run()
        finally:
            leave()

    def _run(self):
        project = self.project
        project.load()
        for note in project.notes:
            self.say(note)
        if self.only or self.limit is not None:   # a mistake here: nothing runs
            self._selection = _Selection(project.variable_set, self.only, self.limit)
        self._plan_workers()
        if self.dry_run:
            return self._print_dry_run()
        os.makedirs(project.queue_dir, exist_ok=True)
        lock = _RunLock(os.path.join(project.queue_dir, "run.lock"))
        notice = lock.acquire()
        if notice:
            self.say(notice)
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self):
        project = self.project
        ledger = self._ledger = _Ledger(project.queue_dir)
        self._prepare_queue()
        if not ledger.total:
            self.say("all %d tasks already succeeded; nothing to run (--fresh runs them "
                     "again)" % ledger.skipped)
            return EXIT_OK
        self._cap_workers()
        note = project.ignored_files_note()
        if note:
            self.say(note)
        project.write_worker_spec()
        ledger.open(self.fresh and not (self._selection and self._selection.only),
                    self._run_header())
        covered = self._selection.matched if self._selection else ledger.skipped + ledger.total
        self.say("%s%s on %s%s; task output in %s" % (
            "%d of %d tasks already succeeded; running " % (
                ledger.skipped, covered) if ledger.skipped else "running ",
            _plural(ledger.total, "task"), _plural(self._places.starting, "worker"),
            self._places.summary(self.project, self._launcher), _display_path(project.output_dir)))
        self._selector = _Selector()
        self._monitor = _Monitor(self._selector, self._gpu_uuids)
        self._next_sample = ledger.started + STATUS_INTERVAL
        self._bar = _StatusBar.for_terminal(self._out, self._terminal_gone)
        try:
            self._signals.install(self._selector, _StatusBar.SIGNALS if self._bar else ())
            if self._stdin_fd is not None:
                _Console(self, self._stdin_fd).register(self._selector)
            _become_subreaper()
            if self._call_main_hook("before_all_tasks"):
                self._run_workers()
            else:
                self._stop("before_all_tasks raised")
        finally:
            self._signals.restore()
            self._orphans.reap(until=time.monotonic() + KILL_WAIT)
            _become_subreaper(False)   # a library caller's process is left as it was
            self._monitor.close()
            self._write_status("finished")
            self._selector.close()
            not_run = len(self.scheduler)
            error = ledger.finish(not_run, self._stopping if self._stopping and not_run else None)
            if error:
                self.say(error)
            ledger.close()
        return self._print_summary()

    def _run_workers(self):
        """Start the workers, run the loop, stop them, run after_all_tasks."""
        self._own_children = _child_pids()
        try:
            if self._bar:
                self._bar.start()
            self._start_workers()
            self._loop()
            if len(self.scheduler):
                self._stop("no worker left to run the remaining tasks")
        finally:
            if self._bar:
                self._bar.finish()   # before teardown: after_all_tasks may hang
            self._stop_all_workers()
            self._write_results()
            if not self._call_main_hook("after_all_tasks"):
                self._hook_failed = True

    def _write_report(self):
        """report.html of the run, named at the summary's end (after it: a
        big sweep's page takes seconds); a failure to write it is said, not
        fatal (the results are recorded)."""
        try:
            self.report_path = report(self.project.directory)
        except KeyboardInterrupt:   # the results are recorded; the page can wait
            self.say("the report was not written (interrupted); `threadward report` writes it")
        except Exception as exc:   # a bug in the page must not lose the run's exit code
            self.say("could not write the report (%s: %s); `threadward report` tries again"
                     % (type(exc).__name__, exc))
        else:
            self.say("report: %s" % _display_path(self.report_path))

    # -- preparing ----------------------------------------------------------

    def _plan_workers(self):
        self._launcher = _Launcher(self.project)
        self._launcher.check_available()
        slots, starting, self._gpu_uuids = self._launcher.plan_slots()
        self._places = _Places(slots, starting)
        self._launcher.plan_cpus(starting)

    def _run_header(self):
        """What the run's first event says of it, beside the counts."""
        project = self.project
        converters = set(project.converters()) | set(project.variable_set.converters())
        gpus = []
        for place in self._places.in_use():
            gpus.extend(gpu for gpu in place.gpus if gpu not in gpus)
        return {"settings": project.settings_record(),
                "variables": [{"name": variable.name, "converter": variable.name in converters}
                              for variable in project.variable_set.variables],
                "workers": self._places.starting, "gpus": gpus}

    def _cap_workers(self):
        for line in self._places.cap(self._ledger.total, self.project, self._launcher):
            self.say(line)

    def _prepare_queue(self):
        self.scheduler, lines = _fill_queue(self.project, self._ledger, self.fresh,
                                            self._selection)
        for line in lines:
            self.say(line)

    def _print_dry_run(self):
        # --limit counts the tasks still to run: a dry run reads (only
        # reads) which have succeeded, as the run will.
        succeeded = set() if self.fresh or self._selection is None else \
            _Ledger(self.project.queue_dir).read_succeeded()
        for line in _dry_run_lines(self.project, self._places, self._launcher,
                                   self._selection, succeeded):
            self.say(line)
        return EXIT_OK

    # -- the loop -----------------------------------------------------------

    def _loop(self):
        while self._workers or self._places.retries:
            try:
                self._step()
            except KeyboardInterrupt:
                # A Ctrl-C, or a notebook's interrupt, that Python's own
                # handler turned into an exception: the same as ours.
                if not self._signals.take_back_sigint():
                    self._on_signal(signal.SIGINT)

    def _step(self):
        """One turn of the loop: events, deadlines, exits, new tasks, results."""
        self._wait_for_events()
        if time.monotonic() >= self._next_deadline:
            self._expire_deadlines()
        self._reap_workers()
        self._assign_tasks()
        self._report_progress()
        self._write_results()

    def _report_progress(self):
        """The bar on a terminal; elsewhere a progress line now and then."""
        bar = self._bar
        if bar is not None and bar.is_open:
            now = time.monotonic()
            if bar.due(now):
                busy = idle = 0
                for worker in self._workers.values():
                    busy += worker.state == Worker.BUSY
                    idle += worker.state == Worker.IDLE
                bar.draw(self._ledger.bar(bar.width, busy, idle, bar.colour), now)
            return
        line = self._ledger.progress()
        if line:
            self.say(line)

    def _wait_for_events(self):
        for key, _ in self._selector.select(self._next_timeout()):
            key.data()

    def _next_timeout(self):
        now = time.monotonic()
        # The sample timer (every STATUS_INTERVAL s) also paces the time-based
        # progress line; a deadline of its own would lie in the past while no
        # task finishes, and the loop would spin.
        deadlines = [w.deadline[0] for w in self._workers.values() if w.deadline]
        deadlines.append(self._next_sample)
        deadlines.extend(when for when, _ in self._places.retries)
        for deadline in (self._stop_deadline, self._monitor.deadline()):
            if deadline:
                deadlines.append(deadline)
        # Deadlines set while handling events lie in the future: the next
        # select sees them, and _expire_deadlines can wait until this one.
        self._next_deadline = min(deadlines)
        return max(0.0, self._next_deadline - now)

    def _expire_deadlines(self):
        now = time.monotonic()
        for slot in self._places.due(now):
            if self._stopping or not len(self.scheduler):
                self._places.give_back(slot)
            else:
                self._start_worker(slot, "retry")
        if self._stop_deadline and now >= self._stop_deadline:
            self._stop_deadline = None
            self.say("grace period over; ending running tasks")
            self._interrupt_running()
        for worker in list(self._workers.values()):
            if worker.deadline and now >= worker.deadline[0]:
                _, action, task = worker.deadline
                worker.deadline = None
                if action == Worker.TIMEOUT:
                    self._on_timeout(worker, task)
                else:
                    worker.kill()
        self._monitor.expire(list(self._workers.values()))
        if now >= self._next_sample:
            self._next_sample = now + STATUS_INTERVAL
            self._sample()

    def _watched_workers(self):
        """Workers whose process tree psutil can see from here."""
        return [w for w in self._workers.values() if w.pid and not w.reports_stats]

    def _sample(self):
        workers = self._watched_workers()
        self._monitor.sample(workers)
        self._ledger.note("sample", workers={
            str(worker.worker_id): {name: worker.stats.get(name) for name in ("cpu", "rss", "gpu")}
            for worker in self._workers.values() if worker.stats})
        if any(w.gpus for w in workers):
            self._monitor.start_gpu_query(self._watched_workers)
        self._write_status("running")

    def _write_status(self, state):
        error = _write_status_file(self.project.status_file, state,
                                   self._show_table(finished=state == "finished"))
        if error:
            self.say(error)

    # -- workers: start, read, reap -----------------------------------------

    def _start_workers(self):
        for _ in range(self._places.starting):
            self._start_worker(self._places.take())

    def _start_worker(self, slot, why="start", replaces=None):
        """A worker in ``slot``; ``why`` (start, add, replace, retry) and the
        worker it ``replaces`` are for the record.  None if it could not start."""
        place = self._places.slots[slot]
        worker = Worker(self._places.new_worker_id(), slot, place, self.project.task_timeout,
                        on_begin=self._on_begin)
        self._ledger.note("worker", worker=worker.worker_id, state="start", slot=slot,
                          gpus=list(place.gpus), why=why, replaces=replaces)
        if not worker.launch(self._launcher, self.project):
            self._note_exit(worker, "could not start: %s" % worker.fatal)
            self._on_start_failure(worker, "it could not be started")
            return None
        self._workers[worker.worker_id] = worker
        worker.watch(self._selector, lambda: self._on_worker_readable(worker),
                     lambda: self._relay(worker, worker.stderr_lines(self._selector)))
        return worker

    def _relay(self, worker, texts):
        """A launcher's own messages (srun, ssh), with the worker's number."""
        try:
            for text in texts:
                sys.stderr.write("[worker %d] %s\n" % (worker.worker_id, text))
            sys.stderr.flush()
        except (OSError, ValueError):
            self._terminal_gone()

    def _on_worker_readable(self, worker):
        lines, ended = worker.read_lines()
        for line in lines:
            self._on_worker_line(worker, line)
        if ended:
            self._relay(worker, worker.unwatch(self._selector))
            if worker.poll() is not None:
                self._on_worker_exit(worker)

    def _on_worker_line(self, worker, line):
        try:
            message = _decode(line)
        except ValueError:
            # e.g. a login script printing on the ssh session before the worker starts
            _stderr("ignored a line from worker %d that is not a protocol message: %r"
                    % (worker.worker_id, line[:200]))
            return
        handler = self._handlers.get(message["op"])
        if handler is not None:
            handler(self, worker, message)

    def _on_ready(self, worker, message):
        worker.ready(message, placed_elsewhere=self._launcher.indirect)
        self._places.started(worker.slot)
        self._ledger.note("worker", worker=worker.worker_id, state="ready",
                          pid=worker.remote_pid or worker.pid, host=worker.host)

    def _on_begin(self, worker, task):
        self._ledger.began(task, worker.worker_id)

    def _note_exit(self, worker, cause):
        self._ledger.note("worker", worker=worker.worker_id, state="exit", cause=cause,
                          code=worker.returncode)

    def _on_stats(self, worker, message):
        for name in ("cpu", "rss", "gpu"):
            if name in message:
                _update_stat(worker.stats, name, message[name])

    def _on_result(self, worker, message):
        if not worker.queue:
            return
        result = _Result.decode(message)
        task = worker.answered()
        worker.last_seconds = result.seconds
        ours = worker.ended_by_us   # the SIGTERM (if any) came from us
        if result.terminated:
            worker.stops_itself()   # it exits after this line: no new task
            self._put_back(worker, worker.take_back(keep_running=False))
        if not result.succeeded and ours and worker.overdue not in (None, task):
            # The task that timed out ended just before our SIGTERM, which
            # reached the next one: that one runs again.
            self._ledger.note("back", id=task.task_id, worker=worker.worker_id)
            self.scheduler.put_back(worker.worker_id, task.indices, started=True)
            return
        # The scheduler learns from tasks that ran to their end.
        self.scheduler.release(worker.worker_id, seconds=result.seconds if result.succeeded
                               else None, load=result.load)
        reason = result.reason
        if not result.succeeded and (ours or result.terminated):
            reason = worker.end_cause if ours else Worker.INTERRUPTED
        self._record(task, result.succeeded, reason, result.seconds, result.load, worker,
                     result.converted)

    def _on_cancelled(self, worker, message):
        task = worker.cancelled(message.get("id"))
        if task is not None:
            self._put_back(worker, [task])

    def _on_terminated(self, worker, message):
        """A SIGTERM between tasks: it exits, starting nothing."""
        worker.stops_itself()
        self._put_back(worker, worker.take_back(keep_running=False))

    def _on_fatal(self, worker, message):
        worker.fatal = message.get("error") or "unknown error"

    _handlers = {OP_READY: _on_ready, OP_STATS: _on_stats, OP_RESULT: _on_result,
                 OP_CANCELLED: _on_cancelled, OP_TERMINATED: _on_terminated,
                 OP_FATAL: _on_fatal}

    def _reap_workers(self):
        for worker in list(self._workers.values()):
            if worker.process.stdout.closed and worker.poll() is not None:
                self._on_worker_exit(worker)
        if self._orphans.killed:
            self._orphans.reap()

    def _on_worker_exit(self, worker):
        """The worker's pipe has closed and its process is gone."""
        if worker.state == Worker.EXITED:
            return
        previous = worker.exited()
        del self._workers[worker.worker_id]
        self._note_exit(worker, self._exit_cause(worker, previous))
        if worker.returncode != 0 and self._launcher.kind == "local":
            # It died: what its tasks started came to us.
            self._orphans.end(self._own_children | self._monitor.pids() | {
                other.pid for other in self._workers.values()})
        self._put_back(worker, worker.take_back())   # first: queued ones undo their joins
        self.scheduler.forget(worker.worker_id)
        reason = worker.exit_reason()
        if worker.queue:
            task = worker.queue.popleft()
            self._record(task, False, worker.lost_task_reason(), worker=worker)
            self._show_log_tail(task)
        if previous == Worker.STARTING:
            self._on_start_failure(worker, reason)
            return
        outside = worker.end_cause == Worker.OUTSIDE
        if worker.retiring or outside or (
                previous == Worker.STOPPING and worker.end_cause != Worker.TIMEOUT):
            if outside and not self._stopping:
                self.say("worker %d was stopped by a SIGTERM from outside threadward; it is "
                         "not replaced (`add` starts another)" % worker.worker_id)
            self._places.give_back(worker.slot)
            return
        self._replace_worker(worker, reason)

    @staticmethod
    def _exit_cause(worker, previous):
        """Why a worker ended, for the record: "shut down" when asked to."""
        if previous == Worker.STARTING:
            return "could not start: %s" % (worker.fatal or worker.exit_reason())
        if worker.ended_by_us:
            return worker.end_cause
        if worker.returncode == 0:
            return "shut down"
        return worker.exit_reason()

    def _on_start_failure(self, worker, reason):
        detail = worker.fatal or "\n".join(worker.stderr_tail) or \
            "%s before it was ready" % reason
        self.say("worker %d could not start (%s):\n%s" % (
            worker.worker_id, reason, "    " + detail.rstrip().replace("\n", "\n    ")))
        if self._stopping or not len(self.scheduler):
            self._places.give_back(worker.slot)
        elif not self._places.failed(worker.slot):
            self.say("giving up worker slot %d after %d failed starts in a row"
                     % (worker.slot, self._places.failures(worker.slot)))
            if not self._workers and not self._places.retries:
                self._stop("no worker could start")

    def _replace_worker(self, worker, reason):
        if self._stopping or not len(self.scheduler):
            self._places.give_back(worker.slot)
            return
        replacement = self._start_worker(worker.slot, "replace", worker.worker_id)
        if replacement is not None:
            self.say("%s; started worker %d in its place" % (reason, replacement.worker_id))

    def _show_log_tail(self, task):
        lines = _log_tail(task.log_file)
        if lines and self.project.failure_handling != "SILENT_CONTINUE":
            self.say("  last lines of %s:\n    %s"
                     % (_display_path(task.log_file), "\n    ".join(lines)))

    # -- handing out tasks --------------------------------------------------

    def _assign_tasks(self):
        """Idle workers ask for tasks (the scheduler says in which order, and
        whether one should wait); busy ones whose tasks are short get their
        next one queued."""
        workers = list(self._workers.values())
        idle = [w for w in workers if w.state == Worker.IDLE]
        free = []
        for worker in idle:
            if self._stopping or worker.retiring:
                self._shut_down(worker)
            else:
                free.append(worker.worker_id)
        # A worker may wait for a task worth its load only while another
        # holds one: an event is then sure to come.
        holding = bool(idle) and any(worker.queue for worker in workers)
        for worker_id, indices in self.scheduler.hand_out(free, holding):
            worker = self._workers[worker_id]
            if indices is not None:
                self._hand(worker, indices)
            elif not len(self.scheduler) and not self._take_back_queued():
                self._shut_down(worker)   # nothing left, here or queued elsewhere
        for worker in workers:
            if worker.state == Worker.BUSY and self._queues_ahead(worker):
                indices = self.scheduler.assign(worker.worker_id, ahead=True)
                if indices is not None:
                    self._hand(worker, indices)

    def _shut_down(self, worker):
        self._ledger.note("worker", worker=worker.worker_id, state="stop")
        worker.shut_down()

    def _hand(self, worker, indices):
        task = _task_of(self.project, indices)
        self._ledger.handed(task, worker.worker_id, queued=bool(worker.queue))
        worker.hand(task, _encode_task(task, self.project.variable_set.texts(
            indices, TASK_VARIABLE), self._ledger.attempt_of(task.task_id)))

    def _queues_ahead(self, worker):
        # STOP_EXECUTION: a task queued ahead would start before the failure
        # of the one before it is known here.
        return (worker.may_queue_ahead() and not self._stopping
                and self.project.failure_handling != "STOP_EXECUTION")

    def _on_timeout(self, worker, task):
        # Its answer may be waiting unread: if the task has ended after all,
        # the SIGTERM would only hit the next one.
        if not worker.process.stdout.closed and _readable_now(worker.fileno()):
            self._on_worker_readable(worker)
        if worker.task is task:
            worker.overdue = task
            worker.end(Worker.TIMEOUT)

    def _take_back_queued(self):
        """An idle worker found nothing: tasks queued behind others' running
        ones come back to the scheduler (True if some may)."""
        waiting = False
        for other in self._workers.values():
            waiting = other.cancel_queued() or waiting
        return waiting

    def _put_back(self, worker, tasks):
        """Tasks ``worker`` never started return to the scheduler (newest first);
        the record says so (a "start" noted for one of them did not happen)."""
        for task in tasks:
            self._ledger.note("back", id=task.task_id, worker=worker.worker_id)
            self.scheduler.put_back(worker.worker_id, task.indices)

    def _stop_all_workers(self):
        """Last resort on the way out (an exception, or workers still alive)."""
        for worker in list(self._workers.values()):
            worker.kill_now()
            self._note_exit(worker, "killed at the run's end")
            self._put_back(worker, worker.take_back())
            if worker.queue:
                self._record(worker.queue.popleft(), False, Worker.INTERRUPTED, worker=worker)
        self._workers.clear()

    # -- results ------------------------------------------------------------

    def _record(self, task, success, reason, seconds=None, load=0.0, worker=None,
                converted=()):
        """The end of an attempt of ``task`` (on ``worker``): a failure with
        RETRIES left runs again, anything else is its outcome."""
        if seconds is None and task.started is not None:
            seconds = time.monotonic() - task.started
        worker_id = None if worker is None else worker.worker_id
        attempt = self._ledger.attempt_of(task.task_id)
        if not success and self._retries_it(reason, attempt):
            self._retry(task, reason, seconds, load, attempt, worker_id, converted)
            return
        reason = self._ledger.record(task.task_id, success, reason, seconds, load, attempt,
                                     worker_id, converted)
        if not success:
            handling = self.project.failure_handling
            if handling != "SILENT_CONTINUE":
                self.say("FAILED %s: %s (log: %s)" % (task.task_id, reason,
                                                      _display_path(task.log_file)))
            if handling == "STOP_EXECUTION":
                self._stop("a task failed and FAILURE_HANDLING is STOP_EXECUTION")
        hook = "on_task_success" if success else "on_task_failure"
        function = _hook_of(self._hooks, self.project.variable_module, hook)
        if function is not None:
            self._write_results()   # the line is on disk before the hook sees the task
            arguments = [self.project.variable_set.variables_of(task.indices), task.folder,
                         task.log_file] + ([] if success else [reason])
            self._call_main_hook(hook, *arguments, module=self.project.variable_module)

    def _retries_it(self, reason, attempt):
        """Whether a failed attempt runs again: RETRIES allows one more, and
        it was not stopped on purpose (interrupted), nor is the run stopping
        (a task handed back now would never be handed out)."""
        return (attempt <= self.project.retries and reason != Worker.INTERRUPTED
                and not self._stopping)

    def _retry(self, task, reason, seconds, load, attempt, worker_id, converted):
        reason = self._ledger.retry(task.task_id, reason, seconds, load, attempt, worker_id,
                                    converted)
        if self.project.failure_handling != "SILENT_CONTINUE":
            self.say("retrying %s (attempt %d of %d): %s" % (
                task.task_id, attempt + 1, self.project.retries + 1, reason))
        # The scheduler has released the attempt already (it ended, or its
        # worker is gone), so the task only goes back among the remaining
        # ones, under its prefix: a worker that holds it loads nothing to
        # run it again.  (put_back would release the task queued behind it.)
        self.scheduler.add(task.indices)

    def _write_results(self):
        error = self._ledger.write()
        if error:
            self.say("%s; stopping: free space or fix permissions, then run again" % error)
            self._stop("results cannot be written")

    # -- stopping -----------------------------------------------------------

    def _stop(self, why):
        """No new tasks; running tasks finish."""
        if self._stopping:
            return False
        self._stopping = why
        for worker in self._workers.values():
            worker.cancel_queued(with_running=True)
        return True

    def _interrupt_running(self):
        """End running tasks now; they are recorded as interrupted."""
        self._interrupting = True
        self._stop("interrupted")
        for worker in self._workers.values():
            if worker.state != Worker.IDLE:
                worker.end(Worker.INTERRUPTED)

    def _on_signal(self, signum):
        if signum in _StatusBar.SIGNALS:
            _StatusBar.on_signal(self._bar, signum)
        elif signum == signal.SIGINT and self._stopping and not self._interrupting:
            self.say("second Ctrl-C: ending running tasks (recorded as interrupted)")
            self._interrupt_running()
        elif signum == signal.SIGUSR1:   # `kill -USR1 PID`: show, where no console is
            self.say(self._show_table())
        elif signum in (signal.SIGTERM, signal.SIGHUP) and not self._stop_deadline \
                and not self._interrupting:
            # Even after `quit`: preemption gives a deadline we must keep.
            # SIGHUP (the terminal closed, ssh dropped) is handled alike.
            name = signal.Signals(signum).name
            grace = self.project.sigterm_grace
            self._stop("by %s" % name)
            self._stop_deadline = time.monotonic() + grace
            self.say("%s: no new tasks; running tasks %s" % (
                name, "may take as long as they need (SIGTERM_GRACE = inf)"
                if grace == float("inf") else "get %gs to finish" % grace))
        elif signum == signal.SIGINT and not self._stopping:
            self._stop("by SIGINT")
            self.say("stopping: no new tasks; running tasks finish "
                     "(press Ctrl-C again to stop running tasks)")

    # -- the verbs of a running sweep ---------------------------------------

    def quit(self):
        """No new tasks; running tasks finish, then teardown.  Returns how
        many tasks are running."""
        if not self._stop("quit"):
            raise ThreadwardError("already stopping (%s)" % self._stopping)
        return sum(1 for w in self._workers.values() if w.state == Worker.BUSY)

    def show(self):
        """Progress and each worker's state, CPU, RAM and GPU memory, measured now."""
        self._monitor.sample(self._watched_workers())
        return self._show_table()

    def add_worker(self):
        """One more worker under the same constraints; None if it could not
        start (and that was said)."""
        if self._stopping:
            raise ThreadwardError("add: not while stopping (%s)" % self._stopping)
        if not len(self.scheduler):
            raise ThreadwardError("add: no tasks are waiting; nothing for a new worker to do")
        if not self._places.free and self.project.gpus_per_worker \
                and self._launcher.kind != "slurm":
            raise ThreadwardError("add: no GPUs left in reserve (every usable GPU share is "
                                  "held by a worker); remove a worker or widen INCLUDE_GPUS")
        if not self._places.free:   # nothing to reserve: one more like the first
            self._places.add_like_the_first()
        return self._start_worker(self._places.take(), "add")

    def remove_worker(self, worker_id):
        """Worker ``worker_id`` takes no new task and shuts down after its
        current one; returns it."""
        worker = self._workers.get(worker_id)
        if worker is None:
            raise ThreadwardError("remove: %s; running workers: %s" % (
                "no worker %s" % worker_id if worker_id is not None else "give a worker ID",
                ", ".join(str(i) for i in self._workers) or "none"))
        worker.retiring = True
        worker.cancel_queued(with_running=True)
        self._ledger.note("worker", worker=worker_id, state="remove")
        return worker

    # -- reporting ----------------------------------------------------------

    def say(self, message):
        try:
            self._out.write(message + "\n")
            self._out.flush()
        except (OSError, ValueError):
            self._terminal_gone()

    def _terminal_gone(self):
        """Our output can no longer be written (the terminal closed, the pipe's
        reader left): the run goes on silently; what it records is on disk."""
        self._bar = None
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)   # Python's flush at exit must not fail either
        os.close(null)
        self._out = open(os.devnull, "w")

    def _show_table(self, finished=False):
        """The `show` view (also in status.json): fits 100 columns."""
        lines = self._ledger.overview(finished) + ["CPU: %s" % self._launcher.cpu_summary()]
        if self._workers:
            lines += _worker_table(self._workers.values(), self.scheduler.is_waiting)
        return "\n".join(lines)

    def _print_summary(self):
        not_run = len(self.scheduler)
        stopped = self._stopping if self._stopping and not_run else None
        for line in self._ledger.summary(stopped, not_run):
            self.say(line)
        self._write_report()
        if self._hook_failed:
            self.say("after_all_tasks raised (see above)")
        return EXIT_OK if not (self._ledger.failed or stopped or self._hook_failed) \
            else EXIT_FAILED

    # -- main-process hooks -------------------------------------------------

    def _call_main_hook(self, name, *arguments, module=None):
        """Run a hook of the main process: before_all_tasks, after_all_tasks,
        or (with its ``arguments``, from variable_iteration.py) a result
        hook; False (and the traceback on the console) if it raised."""
        function = _hook_of(self._hooks, module or self.project.task_module, name)
        try:
            if function is not None:
                function(*arguments)
            return True
        except KeyboardInterrupt:
            # Python's own SIGINT handler is back (the hook, or a library it
            # called, set it): a Ctrl-C, dealt with here, so that it does not
            # unwind through the handling of the worker lines read with it.
            if not self._signals.take_back_sigint():
                self._on_signal(signal.SIGINT)
            return True
        except Exception:
            self.say("%s raised%s:\n%s" % (name, " (the run goes on)" if arguments else "",
                                           traceback.format_exc().rstrip()))
            return False


###############################################################################
# Worker mode (the child side) ################################################
###############################################################################

class _Children:
    """Who owns each child process of a worker, and the ending of the rest.

    * Started while a converter ran: the retained value's.  It lives while
      the value is kept; when the value is dropped (before the next
      converter runs) and at exit, what is left of it is ended.
    * Started by before_each_worker: the worker's, until it exits.
    * Held by a live multiprocessing object (a Pool or ProcessPoolExecutor
      in a module global, DataLoader workers, joblib's loky executor, their
      resource trackers): that object's, reused by the next task.
    * Anything else a task leaves running is a stray, ended when it returns.

    The worker is a subreaper, so descendants that left their parent (double
    forks, new sessions) come back to it as children and are found too.
    """

    def __init__(self):
        self.pid = os.getpid()
        self.of_worker = set()   # started by before_each_worker
        self.of_value = {}       # variable name -> PIDs its converter started
        self.helpers = set()     # nvidia-smi of the stats thread, while it runs

    def owned(self):
        pids = self.of_worker | self.helpers | _pool_pids()
        for value_pids in self.of_value.values():
            pids |= value_pids
        return pids

    def started_by(self, name, before):
        """The converter of ``name`` has returned: what it started is its value's."""
        # With their descendants: `server &` in a shell is the shell's child
        # now, and ours once the shell has exited -- which it may do while we
        # look, so look again until no new child has come back to us.
        owned, children = set(), set()
        while True:
            new = _child_pids() - before - self.helpers
            if new <= children:
                break
            children |= new
            owned.update(_descendants(new))
        self.of_value[name] = owned

    def drop_value(self, name):
        """The value of ``name`` is dropped: end what its converter started."""
        pids = (self.of_value.pop(name, set()) - _helper_pids()) & _child_pids()
        if pids:
            _end_processes(pids)

    def end_strays(self):
        """End every child no one owns (they may hold GPU memory or cores)."""
        if not _has_children():
            return   # the common case, checked cheaply
        for _ in range(3):   # orphans of the ended ones come back to us as children
            strays = _child_pids() - self.owned()
            if not strays:
                return
            _end_processes(strays)

    def end_all(self):
        """(The last exit handler: the user's and multiprocessing's have run.)
        Nothing of the worker's tree outlives it."""
        if os.getpid() == self.pid and _has_children():
            _close_trackers()   # so that they end themselves, cleaning up, as they would
            _end_processes(_child_pids())


class _WorkerProcess:
    """Runs inside a worker subprocess: reads tasks, runs them, reports."""

    def __init__(self, project_dir, worker_id, report_stats=False, read_spec=False):
        self.project = _Project(project_dir)
        self.worker_id = worker_id
        self.report_stats = report_stats   # launched elsewhere: say our own figures
        self.read_spec = read_spec         # import what task_queue/sweep.json names
        self._send_lock = threading.Lock()
        self._sigterm_raises = False
        self._sigterm_pending = False
        self._own_signal_at = None    # when a task last aimed os.kill/killpg at our group
        self._forked = False          # True in a process a task forked
        self.retained = {}            # variable name -> (value, nickname, converted)
        self.load_seconds = 0.0       # spent converting changed values for this task
        self.converted = ()           # the levels whose converters ran for this task
        self._hooks = {}              # hook name -> the user's function, or None
        self._libc = None
        self._streams = None          # our sys.stdin, sys.stdout, sys.stderr
        self.children = _Children()   # who owns each child process

    # -- the private protocol channel ---------------------------------------

    def claim_channel(self):
        """Move fd 0 and 1 aside for the protocol; point 0 at /dev/null and
        1, 2 at the worker log, so nothing a task does can touch the channel."""
        self.channel_in = os.dup(0)     # os.dup makes non-inheritable copies:
        self.channel_out = os.dup(1)    # a task's child processes never get them
        self.console = os.dup(2)
        self.devnull = os.open(os.devnull, os.O_RDWR)
        os.makedirs(self.project.worker_log_dir, exist_ok=True)
        self.worker_log = os.path.join(self.project.worker_log_dir,
                                       "worker_%d.log" % self.worker_id)
        self.worker_log_fd = _open_log(self.worker_log)
        self._point_output(self.worker_log_fd)
        self._lines = collections.deque()   # protocol lines read, not yet handled
        self._cancel_read = False           # a CANCEL is among them
        self._lines_lock = threading.Lock()  # the watchdog thread takes CANCELs too
        self._buffer = _LineBuffer()
        self._poller = select.poll()
        self._poller.register(self.channel_in, select.POLLIN)

    def send(self, line):
        _write_all(self.channel_out, line)

    def _point_output(self, fd):
        """Make fd 0 /dev/null and fd 1, 2 ``fd``; the Python streams follow."""
        unwritten = False
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                unwritten = True
        self._flush_c_stdio()
        if unwritten:
            # What a full disk left in the streams' buffers goes to /dev/null
            # as they are replaced, never into the next log.
            os.dup2(self.devnull, 1)
            os.dup2(self.devnull, 2)
            self._streams = None
            self._restore_streams()
        os.dup2(self.devnull, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        self._restore_streams()

    def _restore_streams(self):
        """sys.stdin/stdout/stderr as ours again if a task closed or replaced them.
        Line-buffered (logs can be followed live), never closing the real fds."""
        ours = self._streams
        if ours is None or (sys.stdin, sys.stdout, sys.stderr) != ours or \
                ours[0].closed or ours[1].closed or ours[2].closed:
            self._streams = (
                open(0, "r", closefd=False),
                open(1, "w", buffering=1, closefd=False, errors="backslashreplace"),
                open(2, "w", buffering=1, closefd=False, errors="backslashreplace"))
            sys.stdin, sys.stdout, sys.stderr = self._streams

    def _flush_c_stdio(self):
        # printf output of C extensions sits in libc buffers: flush it into
        # the log it belongs to before the fds move.
        try:
            if self._libc is None:
                import ctypes
                self._libc = ctypes.CDLL(None)
            self._libc.fflush(None)
        except Exception:
            pass

    # -- the worker loop ----------------------------------------------------

    def run(self):
        self.claim_channel()
        _become_subreaper()
        os.register_at_fork(after_in_child=self._forget_in_child)
        try:
            os.setpgrp()   # a task's processes share our group: one killpg ends them all
        except OSError:
            pass           # already a session leader (local workers are)
        watchdog = _Watchdog(self.channel_in, self.take_cancels)
        try:
            _enter_project(self.project)
            self.project.load_for_worker(self.read_spec)
            self.converters = self.project.converters()
            self.spec = self.project.task_module
            self._call_hook("before_each_worker", self.worker_id)
            self.children.of_worker = set(_descendants(_child_pids()))
        except BaseException as exc:
            _print_traceback()
            error = str(exc) if isinstance(exc, ConfigError) else traceback.format_exc()
            self._send_quietly(_encode(OP_FATAL, error=error))
            return 3
        self._send_quietly(_encode(OP_READY, pid=os.getpid(), host=os.uname().nodename,
                                   gpus=os.environ.get("CUDA_VISIBLE_DEVICES", "")))
        if self.report_stats:
            threading.Thread(target=self._report_stats_forever, daemon=True).start()
        # SIGTERM raises _Terminated only while we wait for a task or run one;
        # elsewhere (sending a result) it is noted and acted on after.
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._watch_own_signals()
        while True:
            try:
                message = self._next_task()
            except _Terminated:
                return 128 + signal.SIGTERM
            if message is None:
                break    # SHUT_DOWN, or end of input: the main process is gone
            started = time.monotonic()
            watchdog.arm()
            try:
                self._sigterm_raises = True
                result = self.run_task(message)
                self._sigterm_raises = False
            except _Terminated:
                self._sigterm_raises = False
                # Preemption (Slurm signals every step) or threadward ending
                # the task: it did not fail, it was stopped; a rerun retries it.
                result = self._result(message, False, "interrupted (SIGTERM)", started)
                self._sigterm_pending = True
            if self._sigterm_pending:
                result.terminated = True
            watchdog.disarm()
            if not self._send_quietly(result.encode()):
                return 0  # the main process is gone: never record anything
        self._call_hook("after_each_worker", self.worker_id)
        return 0

    def _next_task(self):
        """The next task message, or None at SHUT_DOWN or the end of input.
        Tasks a CANCEL line follows are answered "cancelled" and skipped.
        A SIGTERM here raises _Terminated, after every task read and not
        started went back and the parent heard that nothing more starts."""
        with self._lines_lock:
            try:
                while True:
                    if self._sigterm_pending:
                        raise _Terminated()
                    if not self._lines and not self._read_lines(block=True):
                        return None
                    self._read_lines(block=False)   # a CANCEL may wait behind the next task
                    self._apply_cancels()
                    if not self._lines:
                        continue
                    line = self._lines.popleft().strip()
                    if line == SHUT_DOWN:
                        return None
                    return _decode(line)
            except _Terminated:
                self._read_lines(block=False)
                self._give_back(self._lines)
                self._lines.clear()
                self._send_quietly(_encode(OP_TERMINATED))
                raise

    def take_cancels(self):
        """(The watchdog thread, while a task runs.)  Answer a CANCEL behind
        the running task now, so the tasks it takes back can go to an idle
        worker instead of waiting for this one."""
        if not self._lines_lock.acquire(blocking=False):
            return   # the main thread is between tasks: it reads the lines itself
        try:
            self._read_lines(block=False)
            self._apply_cancels()
        finally:
            self._lines_lock.release()

    def _apply_cancels(self):
        """Every task line before the last CANCEL goes back ("cancelled")."""
        if not self._cancel_read:
            return   # the common case: no line to look at again
        self._cancel_read = False
        lines = [line.strip() for line in self._lines]
        if CANCEL not in lines:
            return   # taken with the lines it came in (a SIGTERM gave them back)
        last = len(lines) - 1 - lines[::-1].index(CANCEL)
        self._give_back(lines[:last])
        self._lines = collections.deque(lines[last + 1:])

    def _give_back(self, lines):
        """Answer "cancelled" for the task lines among ``lines``."""
        for line in lines:
            if line.strip().startswith(b"{"):
                self._send_quietly(_encode(OP_CANCELLED, id=_decode(line)["id"]))

    def _read_lines(self, block):
        """Add what the channel holds to self._lines; False at its end."""
        if not block and not self._poller.poll(0):
            return True
        if block:
            self._sigterm_raises = True   # waiting for work: SIGTERM ends the worker
            if self._sigterm_pending:     # it came just before (set first, then looked)
                self._sigterm_raises = False
                raise _Terminated()
        try:
            data = os.read(self.channel_in, READ_SIZE)
        finally:
            if block:
                self._sigterm_raises = False
        lines = self._buffer.feed(data)
        self._cancel_read = self._cancel_read or any(line.strip() == CANCEL for line in lines)
        self._lines.extend(lines)
        return bool(data)

    def _forget_in_child(self):
        """(In a process forked by a task: a fork pool, DataLoader workers.)
        Nothing of the worker's goes with it: SIGTERM ends it as usual, and it
        holds no end of the protocol channel nor the main process's stderr
        (which would keep them open after the worker is gone)."""
        if self._forked:
            return   # a fork's fork: those fd numbers are its parent's own files now
        self._forked = True
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:
            pass
        for fd in (self.channel_in, self.channel_out, self.console):
            try:
                os.close(fd)
            except OSError:
                pass

    def leave(self, code):
        """Before the interpreter exits: the retained values go, and what
        their converters started ends.  The exit (the user's and
        multiprocessing's exit handlers, threads left running) then has
        EXIT_WAIT seconds before every process of the worker is killed."""
        self.retained.clear()
        # The signal and fork handlers keep this object to the very end: it
        # lets go of the user's modules, so that they are torn down in the
        # interpreter's order (a Pool in a module global is finalized while
        # multiprocessing still works, as in a plain script).
        self.spec = self.converters = self.project = None
        self._hooks.clear()
        gc.collect()
        for name in list(self.children.of_value):
            self.children.drop_value(name)
        timer = threading.Timer(EXIT_WAIT, _end_everything, args=(code,))
        timer.daemon = True
        timer.start()

    def _watch_own_signals(self):
        """A task ending its child's process group (os.killpg(os.getpgid(
        child.pid), SIGTERM), a common idiom) signals this worker too: the
        child shares its group.  os.kill and os.killpg note when a task aims
        a signal at our group (from any thread; on the main thread our
        handler also runs before they return), and a SIGTERM within
        OWN_SIGNAL_WINDOW of that is not taken for preemption."""
        import ctypes
        check_signals = ctypes.pythonapi.PyErr_CheckSignals
        real_kill, real_killpg, worker = os.kill, os.killpg, self

        def aimed(function, target, *rest):
            if os.getpid() != worker.children.pid:   # a forked child: nothing to note
                return function(target, *rest)
            worker._own_signal_at = time.monotonic()
            function(target, *rest)
            if threading.current_thread() is threading.main_thread():
                check_signals()   # our handler runs now, while the mark is fresh

        def kill(pid, sig):
            if pid == 0 or -pid == os.getpgrp():
                return aimed(real_kill, pid, sig)
            return real_kill(pid, sig)

        def killpg(pgid, sig):
            if pgid in (0, os.getpgrp()):
                return aimed(real_killpg, pgid, sig)
            return real_killpg(pgid, sig)

        kill.__doc__, killpg.__doc__ = real_kill.__doc__, real_killpg.__doc__
        os.kill, os.killpg = kill, killpg

    def _on_sigterm(self, signum, frame):
        if self._own_signal_at is not None and \
                time.monotonic() - self._own_signal_at < OWN_SIGNAL_WINDOW:
            return   # a task's own os.killpg of its child's group (any thread): not for us
        if self._sigterm_raises:
            raise _Terminated()
        self._sigterm_pending = True

    def _send_quietly(self, message):
        try:
            with self._send_lock:   # the stats thread writes lines too
                self.send(message)
            return True
        except OSError:
            return False

    def _report_stats_forever(self):
        """A worker the main process cannot watch (launched by srun or ssh)
        sends its own CPU %, RSS and GPU memory, summed over its process tree."""
        psutil = _import_psutil()
        known = {}
        while True:
            time.sleep(STATUS_INTERVAL)   # a worker thread, not the main loop
            stats = {}
            pids = {os.getpid()}
            if psutil is not None:
                try:
                    pids |= {p.pid for p in psutil.Process().children(recursive=True)}
                except psutil.Error:
                    pass
                known = {pid: known[pid] for pid in pids if pid in known}
                stats["cpu"], stats["rss"] = _tree_usage(psutil, pids, known)
            if os.environ.get("CUDA_VISIBLE_DEVICES"):
                stats["gpu"] = _own_gpu_memory(pids, self.children.helpers)
            if not self._send_quietly(_encode(OP_STATS, **stats)):
                return

    def _hook(self, name):
        return _hook_of(self._hooks, self.spec, name)

    def _call_hook(self, name, *arguments):
        function = self._hook(name)
        if function is not None:
            return function(*arguments)
        return None

    # -- one task -----------------------------------------------------------

    def run_task(self, message):
        started = time.monotonic()
        self.load_seconds = 0.0
        self.converted = ()
        folder, log_file = message["folder"], message["log"]
        attempt = message.get("attempt", 1)
        mode = self.project.output_mode
        try:
            if _make_folder(folder):
                _remove_result(folder)   # an earlier attempt's or run's
            log_fd = _open_log(log_file, go_on=attempt > 1)
            if attempt > 1:
                os.write(log_fd, b"\n==== threadward: attempt %d (the attempts before it "
                                 b"are above) ====\n" % attempt)
        except OSError as exc:
            return self._result(message, False, "cannot create the task folder or log: %s"
                                % exc, started)
        tee = None
        if mode == "LOG_FILE_ONLY":
            self._point_output(log_fd)
        elif mode == "CONSOLE_ONLY":
            self._point_output(self.console)
        else:
            tee = _Tee(log_fd, self.console)
            self._point_output(tee.write_fd)
        try:
            success, reason = self._run_hooks(message["vars"], folder, log_file)
            if not success and mode == "LOG_FILE_ONLY":
                reason = self._log_failure(log_fd, log_file) or reason
        finally:
            self._point_output(self.worker_log_fd)
            self.children.end_strays()
            if tee is None or tee.close():
                os.close(log_fd)
        return self._result(message, success, reason, started)

    @staticmethod
    def _log_failure(log_fd, log_file):
        """'task.log: No space left on device' if the log cannot take a byte
        more (the real reason the task's print failed), else None."""
        try:
            os.write(log_fd, b"\n")
        except OSError as exc:
            return "%s: %s" % (os.path.basename(log_file), exc.strerror or exc)
        return None

    def _result(self, message, success, reason, started):
        return _Result(message["id"], success, reason, time.monotonic() - started,
                       self.load_seconds, self.converted)

    def _run_hooks(self, variable_list, folder, log_file):
        """before_each_task, task_method, after_each_task, verify_task_success,
        judged by SUCCESS_CONDITION; returns (success, one-line reason)."""
        condition = self.project.success_condition
        error = None
        # If a converter fails, verify_task_success still gets the raw values.
        variables = {name: value for name, value, _ in variable_list}
        try:
            variables = self._convert(variable_list)
            self._call_hook("before_each_task", variables, folder, log_file)
            try:
                # Saved before the later hooks run: they may read or check it.
                _save_result(self.spec.task_method(variables, folder, log_file), folder)
            finally:
                self._call_hook("after_each_task", variables, folder, log_file)
        except (Exception, SystemExit) as exc:
            _print_traceback()
            error = "%s: %s" % (type(exc).__name__, exc)
        if condition == "ALWAYS_SUCCESS":
            return True, ""
        if condition == "NO_ERROR_ONLY":
            return error is None, error or ""
        if condition == "NO_ERROR_AND_VERIFY" and error is not None:
            return False, error
        verify = self._hook("verify_task_success")
        if verify is None:
            return (True, "") if condition == "VERIFY_ONLY" else (error is None, error or "")
        try:
            verified = verify(variables, folder, log_file)
        except Exception as exc:
            _print_traceback()
            return False, "verify_task_success raised %s: %s" % (type(exc).__name__, exc)
        if verified:
            return True, ""
        return False, "verify_task_success returned %r" % (verified,) + (
            " (after %s)" % error if error else "")

    def _holds(self, name, value, nickname):
        held = self.retained.get(name)
        return held is not None and held[1] == nickname and held[0] == value \
            and type(held[0]) is type(value)

    def _convert(self, variable_list):
        """{name: value} for a task; converters run only for changed values,
        and a changed value's old object is released before the new one is made."""
        changed = [(level, name, value, nickname)
                   for level, (name, value, nickname) in enumerate(variable_list)
                   if not self._holds(name, value, nickname)]
        began = time.monotonic()
        released = [name for _, name, _, _ in changed
                    if self.retained.pop(name, None) is not None and name in self.converters]
        converted_levels = self.converted = []   # a converter's call that raises counts too
        try:
            if released:
                gc.collect()   # free the old model before the converter loads the new one
                for name in released:
                    self.children.drop_value(name)
                self.children.end_strays()   # workers of pools the dropped objects held
            for level, name, value, nickname in changed:
                converter = self.converters.get(name)
                converted = value
                if converter is not None:
                    converted_levels.append(level)
                    before = _child_pids()
                    converted = converter(str(value), nickname)
                    self.children.started_by(name, before)
                self.retained[name] = (value, nickname, converted)
        finally:
            if released or converted_levels:
                self.load_seconds = time.monotonic() - began   # the scheduler weighs moves by it
        return {name: self.retained[name][2] for name, _, _ in variable_list}


class _Tee:
    """LOG_FILE_AND_CONSOLE: a pipe whose bytes go to the log and the console."""

    def __init__(self, log_fd, console_fd):
        read_fd, self.write_fd = os.pipe()
        self._thread = threading.Thread(target=self._copy, args=(read_fd, log_fd, console_fd),
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _copy(read_fd, log_fd, console_fd):
        try:
            while True:
                data = os.read(read_fd, READ_SIZE)
                if not data:
                    break
                for fd in (log_fd, console_fd):
                    try:
                        _write_all(fd, data)
                    except OSError:
                        pass
        finally:
            os.close(read_fd)

    def close(self):
        """False if the copy is still going (something still holds the pipe):
        then the log fd must stay open, lest its number be reused under it."""
        os.close(self.write_fd)
        self._thread.join(KILL_WAIT)
        return not self._thread.is_alive()


def _json_default(value):
    """What json cannot write itself: numpy arrays and scalars, torch
    tensors (whatever has .tolist()) become lists and numbers."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError("%s is not a JSON value" % type(value).__name__)


def _save_result(returned, folder):
    """A dict returned by task_method becomes result.json in the task folder
    (written whole, then renamed: never half a file); None leaves the folder
    as the task left it (a result.json it wrote itself is kept)."""
    if returned is None:
        return
    if not isinstance(returned, dict):
        # Into the task's log: a task returning something else worked before
        # results existed, and must not fail now.
        _stderr("task_method returned %s, not a dict: it is not saved; return a dict of "
                "JSON values to have it in result.json" % type(returned).__name__)
        return
    try:
        text = json.dumps(returned, indent=1, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise TypeError("task_method returned a dict that cannot be saved as result.json "
                        "(%s); return numbers, strings, booleans, None, lists and dicts "
                        "with string keys" % exc) from None
    _atomic_write(os.path.join(folder, "result.json"), text + "\n")


def _remove_result(folder):
    try:
        os.unlink(os.path.join(folder, "result.json"))
    except FileNotFoundError:
        pass


def _print_traceback():
    """The traceback of the exception being handled, into the task's log;
    a log that cannot be written (a full disk) must not end the worker."""
    try:
        traceback.print_exc()
    except (OSError, ValueError):
        pass


def _make_folder(folder):
    """True if the folder was there already (of an earlier attempt or run)."""
    # One mkdir in the common case (parent exists); makedirs only when needed.
    try:
        os.mkdir(folder)
    except FileExistsError:
        if not os.path.isdir(folder):
            raise
        return True
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    return False


class _Terminated(BaseException):
    """SIGTERM reached a worker (not an Exception: a task's `except
    Exception` must not swallow it)."""


class _Watchdog:
    """Watches the protocol channel while a task runs.

    If the channel hangs up (the main process, or the srun / ssh between us,
    is gone), nobody will take the result: it ends the task and the worker
    at once.  poll() reports POLLHUP whatever events are asked for, even with
    a line still unread, so arm() and disarm() only set a flag and a short
    task costs this thread nothing.  arm() also looks for a hang-up that came
    while disarmed, so a task read just before the main process died never
    starts.

    Every CANCEL_CHECK_INTERVAL s of a running task it also answers a CANCEL
    that waits behind it: a task queued behind a long one goes back to the
    main process at once, not when the long one ends.
    """

    def __init__(self, channel_in, take_cancels):
        self._channel = channel_in
        self._take_cancels = take_cancels
        self._armed = False
        self._hung_up = False
        threading.Thread(target=self._watch, daemon=True).start()

    def arm(self):
        self._armed = True
        if self._hung_up:
            _end_everything()

    def disarm(self):
        self._armed = False

    def _watch(self):
        poller = select.poll()
        # POLLHUP, POLLERR and POLLNVAL always; POLLRDHUP for a socket whose
        # other end only shut down its writing (some ssh builds).
        poller.register(self._channel, getattr(select, "POLLRDHUP", 0))

        while not poller.poll(CANCEL_CHECK_INTERVAL * 1000):
            if self._armed:
                self._take_cancels()
        # Each side sets its own flag before reading the other's, so the
        # hang-up of an armed worker cannot slip between the two.
        self._hung_up = True
        if self._armed:
            _end_everything()


def _own_gpu_memory(pids, helper_pids):
    """Bytes of GPU memory used by ``pids``, from nvidia-smi (None if unknown).
    While it runs, nvidia-smi's PID is in ``helper_pids``, so that the end of
    a task does not take it for one of the task's processes."""
    try:
        query = subprocess.Popen(_Monitor.QUERY, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    helper_pids.add(query.pid)
    try:
        output, _ = query.communicate(timeout=NVIDIA_SMI_TIMEOUT)
    except subprocess.TimeoutExpired:
        query.kill()
        query.wait()
        return None
    finally:
        helper_pids.discard(query.pid)
    return sum(used for pid, used, _ in _compute_apps(output) if pid in pids)


def _pin_cpus(cores):
    """PIN_CPUS: run on the cores the main process chose ("0,1")."""
    if cores:
        try:
            os.sched_setaffinity(0, [int(core) for core in cores.split(",")])
        except (AttributeError, OSError, ValueError) as exc:
            _stderr("could not pin the worker to cores %s: %s" % (cores, exc))


def _worker_main(argv):
    import atexit
    project_dir, worker_id = argv[0], int(argv[1])
    _pin_cpus(os.environ.pop(CPUS_ENV, None))
    worker = _WorkerProcess(project_dir, worker_id, report_stats="--report-stats" in argv[2:],
                            read_spec="--sweep" in argv[2:])
    # Registered before any user code imports multiprocessing: it runs last.
    atexit.register(worker.children.end_all)
    code = 1
    try:
        code = worker.run()
    finally:
        worker.leave(code)
    return code


###############################################################################
# Project scaffolding (init) ##################################################
###############################################################################

# What `init` writes where no templates/ is found (threadward.py copied
# alone): a small sweep that runs as it is, each file pointing to its full,
# commented template.  tests/test_vendoring.py checks that these set only
# settings the full templates set, so the two cannot drift apart unseen.
_COMPACT_POINTER = "# Short version. Full, commented: templates/%s in the threadward repository\n"
_COMPACT_TEMPLATES = {
    "task_specification.py": """\
import json
import os

SUCCESS_CONDITION = "NO_ERROR_ONLY"
RETRIES = 0


def task_method(variables, task_folder, log_file):
    print("running", variables)
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump(variables, stream)
""",
    "resource_constraints.py": """\
NUM_WORKERS = 2
NUM_GPUS_PER_WORKER = 0
""",
    "variable_iteration.py": """\
FAILURE_HANDLING = "PRINT_FAILURE_AND_CONTINUE"
TASK_FOLDER_LOCATION = "VARIABLE_SUBFOLDER"


def setup_variable_set(variable_set):
    # Highest level first: a worker keeps its model while its seeds run.
    variable_set.add_variable(name="model", values=["small", "large"])
    variable_set.add_variable(name="seed", values=[0, 1, 2])
""",
}


def _template_dir():
    """templates/ beside this file (checkout, vendored copy, editable install:
    a link to it is followed), or where setup.py installs it
    (sys.prefix/share/threadward/templates); None if there is none."""
    candidates = [os.path.join(os.path.dirname(os.path.realpath(__file__)), "templates"),
                  os.path.join(sys.prefix, "share", "threadward", "templates")]
    user_base = getattr(site, "USER_BASE", None)
    if user_base:
        candidates.append(os.path.join(user_base, "share", "threadward", "templates"))
    for candidate in candidates:
        if all(os.path.isfile(os.path.join(candidate, f)) for f in CONFIG_FILES):
            return candidate
    return None


def _template_text(templates, name):
    if templates is None:
        return _COMPACT_POINTER % name + _COMPACT_TEMPLATES[name]
    with open(os.path.join(templates, name)) as source:
        return source.read()


def init_project(directory, out=None):
    """Create DIR/threadward/ from the templates (the compact ones built in
    when there is no templates/); never overwrite a file."""
    out = out or sys.stdout
    project = _Project(directory)
    templates = _template_dir()
    os.makedirs(project.queue_dir, exist_ok=True)
    created, kept = [], []
    for name in CONFIG_FILES:
        target = project.path(name)
        if os.path.exists(target):
            kept.append(target)
            continue
        text = _template_text(templates, name)
        with open(target, "x") as stream:
            stream.write(text)
        created.append(target)
    for name in ("all_tasks.json",) + RESULT_FILES:
        target = os.path.join(project.queue_dir, name)
        if os.path.exists(target):
            kept.append(target)
        else:
            open(target, "x").close()
            created.append(target)
    for path in created:
        out.write("created %s\n" % _display_path(path))
    if templates is None and any(p.endswith(".py") for p in created):
        out.write("no templates/ beside threadward.py: wrote short versions (the full, "
                  "commented ones are templates/ in the threadward repository)\n")
    if kept:
        out.write("left alone (already there): %s\n" % ", ".join(
            _display_path(p) for p in kept))
    out.write("next: fill in %s, then `threadward run%s`\n" % (
        _display_path(project.config_dir),
        "" if os.path.abspath(directory) == os.getcwd() else " " + directory))
    return EXIT_OK


###############################################################################
# Command-line interface ######################################################
###############################################################################

def _build_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="threadward",
        description="Run a Python task over every combination of variables on persistent "
                    "subprocess workers.")
    parser.add_argument("--version", action="version", version="threadward " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    init = commands.add_parser("init", help="create DIR/threadward/ with the three template "
                                            "files to fill in")
    init.add_argument("directory", nargs="?", default=".", metavar="DIR")
    run = commands.add_parser(
        "run", help="run every task of DIR/threadward/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every task of DIR/threadward/ that has not succeeded yet.",
        epilog="while it runs, " + CONSOLE_HELP + "\n\nsignals: Ctrl-C (SIGINT) once: "
        "like quit; twice: end running tasks; SIGTERM, SIGHUP: no new tasks, running\n"
        "tasks get SIGTERM_GRACE s; SIGUSR1: print the show table\n\n"
        "exit codes: 0 every task succeeded; 1 a task failed or the run stopped early;\n"
        "2 a configuration or usage error (nothing was run)")
    run.add_argument("directory", nargs="?", default=".", metavar="DIR",
                     help="the project directory, holding threadward/ (default: the current "
                          "directory)")
    run.add_argument("--fresh", action="store_true",
                     help="forget earlier results and run every task again (with --only: "
                          "those tasks' results only)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the tasks, workers and GPUs, and run nothing")
    run.add_argument("--only", action="append", default=[], metavar="NAME=VALUE[,VALUE...]",
                     help="run only the tasks whose variable NAME has one of these values "
                          "(or nicknames); repeat it for several variables (all must hold)")
    run.add_argument("--limit", type=_positive_int, metavar="N",
                     help="run at most N tasks: the first N still to run, in task-list order")
    status = commands.add_parser("status", help="show a running sweep (from another terminal)")
    status.add_argument("directory", nargs="?", default=".", metavar="DIR")
    table = commands.add_parser(
        "results", help="print one row per task: status, seconds, attempts, the variables and "
                        "the task's result.json",
        description="Print one row per task, in generation order: task_id, status (succeeded, "
                    "failed, not run), reason, seconds, attempts, each variable's value, then "
                    "the keys of the task's result.json (one that repeats a column is "
                    "prefixed result.).")
    table.add_argument("directory", nargs="?", default=".", metavar="DIR")
    table.add_argument("--format", choices=RESULT_FORMATS, default="csv",
                       help="csv (default, with a header line), jsonl (a JSON object per "
                            "line) or markdown (a table)")
    table.add_argument("--where", action="append", default=[], metavar="NAME=VALUE",
                       help="only the rows whose column NAME is VALUE (a variable matches its "
                            "value or nickname); repeat a NAME for either of several values; "
                            "different NAMEs must all match")
    page = commands.add_parser(
        "report", help="write an HTML page of the last run (timeline, loads, time by value, "
                       "resources, failures) and print its path",
        description="Write one self-contained HTML page of the project's last run, from "
                    "threadward/task_queue/events.jsonl (during a run too: what happened so "
                    "far), and print its path. Every run writes it at its end.")
    page.add_argument("directory", nargs="?", default=".", metavar="DIR")
    page.add_argument("-o", "--output", metavar="FILE",
                      help="where to write it (default: DIR/threadward/%s)" % REPORT_FILE)
    return parser


def _positive_int(text):
    import argparse
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError("%r is not a whole number of tasks, 1 or more" % text)
    return number


def _cmd_init(args):
    return init_project(args.directory)


def _cmd_run(args):
    return Threadward(args.directory, fresh=args.fresh, dry_run=args.dry_run,
                      only=args.only, limit=args.limit).run()


def _cmd_status(args):
    project = _Project(args.directory)
    try:
        with open(project.status_file) as stream:
            status = json.load(stream)
    except FileNotFoundError:
        raise ThreadwardError("no status file at %s; is a run going on in this project?"
                              % _display_path(project.status_file))
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.get("updated", 0)))
    if status.get("state") == "finished":
        header = "the run finished; its last status (%s):" % updated
    elif _pid_alive(status.get("pid")):
        header = "running (main process %s), updated %s:" % (status.get("pid"), updated)
    else:
        header = "the run (main process %s) is gone; its last status (%s):" % (
            status.get("pid"), updated)
    sys.stdout.write(header + "\n" + status.get("show", "") + "\n")
    return EXIT_OK


def _cmd_results(args):
    rows = list(_result_rows(args.directory))
    # The columns of the whole table: a header even when no row is selected.
    columns = _columns(row for row, _ in rows)
    rows = _where_filter(args.where, rows)
    _write_table([row for row, _ in rows], columns, args.format, sys.stdout)
    sys.stdout.flush()   # here, where a reader that left is handled (main)
    return EXIT_OK


def _cmd_report(args):
    sys.stdout.write(_display_path(report(args.directory, args.output)) + "\n")
    return EXIT_OK


def main(argv=None):
    """The `threadward` command; returns the exit code."""
    # User files that `import threadward` must get this module, not a second copy.
    if __name__ == "__main__":
        sys.modules.setdefault("threadward", sys.modules["__main__"])
    argv = sys.argv[1:] if argv is None else list(argv)
    _ensure_std_fds()
    if argv[:1] == [WORKER_MODE]:
        return _worker_main(argv[1:])
    args = _build_parser().parse_args(argv)
    handler = {"init": _cmd_init, "run": _cmd_run, "status": _cmd_status,
               "results": _cmd_results, "report": _cmd_report}[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        _stderr("configuration error: %s" % exc)
        return EXIT_USAGE
    except ThreadwardError as exc:
        _stderr("error: %s" % exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _stderr("interrupted before any task ran" if args.command == "run" else "interrupted")
        return 130
    except BrokenPipeError:
        # `threadward run --dry-run | head`: the reader left; so do we, quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""threadward: run one Python task over every combination of variables, on
persistent subprocess workers that keep what they have loaded.

Usage::

    threadward init [DIR]      # write DIR/threadward/ from templates/ (or short ones)
    threadward run [DIR]       # expand the variables, start workers, run
    threadward status [DIR]    # what a running sweep is doing (from its status file)

(`python -m threadward ...` and `python threadward.py ...` work the same.)

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
                successful_tasks.txt / failed_tasks.txt (whole lines only)

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
           "ConfigError", "main"]


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
import json
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
# Constants and protocol ######################################################
###############################################################################

WORKER_MODE = "__threadward_worker__"   # argv[1] that turns main() into a worker
SHUT_DOWN = "SHUT_DOWN"
CANCEL = "CANCEL"

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
# The settings of each project file: one in the wrong file, or a name a
# letter or two off one of them, is a configuration error.
SETTINGS = {
    "task_specification.py": ("SUCCESS_CONDITION", "OUTPUT_MODE", "SIGTERM_GRACE",
                              "TASK_TIMEOUT"),
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


def _write_all(fd, data):
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _readable_now(fd):
    """Whether ``fd`` has something to read (poll: any fd number, unlike select)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


# JSON without json.dumps's per-call set-up, for protocol lines.
_json_text = json.JSONEncoder().encode
_json_decode = json.JSONDecoder().decode


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


def _open_log(path):
    """A log opened afresh, never through a symbolic link planted at its
    name (that would truncate the link's target): such a link is replaced.
    A task folder that is itself a link (to scratch storage) is fine."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW
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
    pids = set()
    process = sys.modules.get("multiprocessing.process")
    if process is not None:
        pids.update(p.pid for p in _referenced_elsewhere(process._children) if p.pid)
    for module_name, holder, attribute in _POOL_HELPERS:
        pid = getattr(getattr(sys.modules.get(module_name), holder, None), attribute, None)
        if isinstance(pid, int):
            pids.add(pid)
    return pids


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
                 "texts")

    def __init__(self, name, values, nicknames, interaction):
        self.name = name
        self.values = values        # JSON scalars, as the task receives them
        # Strings, or None for str(value), made when asked: the str() of a
        # million ints would be 55 MB held for the whole run.
        self.nicknames = nicknames
        self.renamed = {}           # {index: folder} where the folder is not the nickname
        self.folders = None         # every folder name, up to CACHE_VALUES values
        self.interaction = interaction
        self.rules = []             # exceptions: [(depth, value index, allowed indices)]
        self.texts = {}             # JSON text per value, built lazily: see _texts

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
                     exceptions=None):
        """Add the next (lower) level of the hierarchy.

        values: JSON scalars keep their type; anything else is stored as str().
        nicknames: names for logs and folders (default: the values).
        interaction: "cartesian" (every value under every combination above) or
            "zip" (the i-th value goes with the i-th value of the variable above).
        exceptions: {value or nickname above: [values of this variable]}.
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
        variable = _Variable(name, values, nicknames, interaction)
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

    def protocol_fragment(self, indices):
        """The "vars" of a task line, [[name, value, nickname], ...], as JSON
        text from cached pieces."""
        return "[" + ",".join(self._texts(indices, "[%s,%s,%s]")) + "]"

    def json_fragment(self, indices):
        """The "variables" object of one all_tasks.json entry, from cached pieces."""
        return "{" + ", ".join(self._texts(indices, '%s: {"value": %s, "nickname": %s}')) + "}"

    def _texts(self, indices, template):
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
                                             _json_text(variable.nickname(index))))
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

    def message(self, variable_set):
        """The protocol line that hands this task to a worker."""
        return ('{"op":"task","id":%s,"folder":%s,"log":%s,"vars":%s}\n' % (
            _json_text(self.task_id), _json_text(self.folder), _json_text(self.log_file),
            variable_set.protocol_fragment(self.indices))).encode()


def _task_id(folders, location):
    """The ID of a task, which is also its folder's path under the output root."""
    return ("/" if location == "VARIABLE_SUBFOLDER" else "_").join(folders)


###############################################################################
# Scheduler ###################################################################
###############################################################################

class _Node:
    __slots__ = ("children", "remaining", "active", "worked", "finished", "longest", "entered")

    def __init__(self, leaf_level):
        # Above the last variable: {value index: _Node}, insertion-ordered.
        # At the last variable: a deque of value indices.
        self.children = collections.deque() if leaf_level else {}
        self.remaining = 0
        self.active = 0   # tasks held by workers (running or queued) in this subtree
        self.entered = False   # a worker has been given a task in it (so loaded it)
        self.worked = 0.0   # seconds of its tasks measured so far, loads excluded
        self.finished = 0   # how many were measured
        self.longest = 0.0   # the longest of them

    def task_seconds(self, default=None):
        """The mean task time measured in this subtree (loads excluded)."""
        return self.worked / self.finished if self.finished else default


def _seconds_per_worker(node, default):
    """The branch's work left per worker if one more joined (its own mean
    task time where it has one)."""
    return node.remaining * node.task_seconds(default) / (node.active + 1)


class _Scheduler:
    """The remaining tasks as a prefix tree with counts; no processes in it.

    ``assign(key)`` gives the worker ``key`` the remaining task that keeps the
    longest prefix of its previous task.  When its own branch is exhausted it
    goes where no other worker is (first such branch in order); only when
    every branch is busy does it split the one with the fewest workers and the
    most work left, taking from the far end so the owner keeps its order.
    It joins that branch only if the load it needs pays (``_worth_joining``,
    from the task and load seconds ``release`` learns) and while the joins
    made at that level leave room (``_may_join``: W - 1 of them, so a level
    of P prefixes is loaded at most P + W - 1 times, more when task times
    vary, and always for a task that looks stuck); otherwise it gets None
    and waits, and asks again after the next event.
    Every step is O(depth x branching) (plus, when a worker's branch ends and
    every other is busy, a look at the tasks held), never a scan of the queue.
    """

    def __init__(self, depth, clock=time.monotonic):
        self.depth = depth
        self.root = _Node(depth == 1)
        self.clock = clock
        self._last = {}      # key -> indices of its previous task
        self._before = {}    # key -> the one before that (see put_back)
        self._reverse = {}   # key -> True while it works from the far end of a shared branch
        # key -> [(nodes on the path of a task it holds, level it left the
        #          previous prefix at, when it was given (when it started, for
        #          the oldest), the task, levels at which taking it was a
        #          join, nodes first entered by it)], oldest first
        self._busy = {}
        self._loads = {}     # level a move left the previous prefix at -> [seconds, count, longest]
        self._joins = [0] * depth    # per level: entries into a branch already entered
        self._workers = set()        # every key that asked: the W of P + W - 1
        self._spread = [0.0, 0]      # squared relative deviations of task times, count
        self._steady = {}            # key -> its last task's seconds, if it kept its prefix

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

    def assign(self, key, ahead=False, patient=True):
        """Indices of the next task for worker ``key``, or None when none
        remain or (``patient``) none is worth its load now.  ``ahead``: the
        worker is still running its previous task (this one is queued behind
        it), which stays counted where it is."""
        self._workers.add(key)
        if not ahead:
            while key in self._busy:
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
        for level in joins:
            self._joins[level] += 1
        task = tuple(path)
        self._before[key] = last
        self._last[key] = task
        self._reverse[key] = reverse
        self._busy.setdefault(key, []).append((nodes, kept, self.clock(), task, joins, firsts))
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
        """How many levels of worker ``key``'s previous task still have tasks
        left: of several workers free at once, the longest asks first, so a
        branch's own worker is back in it before another could find it free."""
        return len(self._kept_nodes(self._last.get(key, ()))) - 1

    def _choose(self, node, reverse, at_root, level, loading_from, patient):
        """(index, child, reverse) of the branch of ``node`` (at ``level``) to
        go into: the first with no worker (the last, working from the far
        end); else a busy one, the most work per worker first, from its far
        end.  ``patient``: past ``_may_join``, only a busy branch whose task
        looks stuck.  With ``loading_from`` (the level the worker must load
        from to get there), only a busy branch worth that load.  None if
        there is none."""
        children = node.children
        order = reversed(children) if reverse and not at_root else children
        for index in order:
            child = children[index]
            if not child.active:
                return index, child, reverse and not at_root
        overall = self.root.task_seconds(1.0)
        # A branch whose last tasks are running stays until they end: not into it.
        busy = [i for i in children if children[i].remaining]
        if patient and not self._may_join(level):
            rescue = self._rescue(node, level)
            busy = [i for i in busy if i in rescue]
            if not busy:
                return None
        if loading_from is None:
            index = max(busy, key=lambda i: _seconds_per_worker(children[i], overall))
            return index, children[index], True
        busy.sort(key=lambda i: _seconds_per_worker(children[i], overall), reverse=True)
        running = self._running_time_left(node, loading_from)
        for index in busy:
            if self._worth_joining(children[index], loading_from, running.get(index, 0.0)):
                return index, children[index], True
        return None

    def _may_join(self, level):
        """Whether one more worker may join a busy branch at ``level``.  Each
        prefix is loaded once when first entered, and each join loads it once
        more: at most W - 1 joins keeps a level of P prefixes within P + W - 1
        loads, what cutting the sweep in W contiguous runs would take.  That
        plan fits tasks of equal length; when task times vary, the last tasks
        of a branch can run long, and joining it is how the sweep catches up,
        so the allowance grows with the measured spread of task times."""
        workers = len(self._workers)
        total, count = self._spread
        slack = int(workers * (total / count) ** 0.5) if count else 0
        return self._joins[level] < workers - 1 + slack

    def _rescue(self, node, level):
        """Indices of the children of ``node`` (at ``level``) that a worker
        may join past ``_may_join``: one whose running task looks hung
        (``_overdue``; any, while no task has been measured) while no task
        outside it is running as expected.  A hung task must not keep the
        others off its branch for good, but a slow one (a big model loading)
        must not draw them in while the rest of the sweep goes on as planned."""
        now, late, running = self.clock(), set(), set()
        for held in self._busy.values():
            for position, (nodes, held_level, started, task, _, _) in enumerate(held):
                under = task[level] if len(nodes) > level + 1 and nodes[level] is node else None
                if position == 0 and (not self.root.finished
                                      or self._overdue(nodes, held_level, started, now)):
                    if under is not None:
                        late.add(under)
                else:
                    running.add(under)
        return {index for index in late if running <= {index}}

    def _overdue(self, nodes, level, started, now):
        """Whether a task on the path ``nodes``, which left its worker's
        previous prefix at ``level`` and started at ``started``, has run over
        twice as long as expected: the longest task measured on its path; or,
        if it loads, ten times the longest load measured plus the longest task
        of the sweep (one prefix's load says little of another's: a big model
        can take ten times a small one, and a load inside task_method counts
        as task time).  Never while nothing is measured."""
        if level < self.depth - 1:
            loads = max((learned[2] for learned in self._loads.values()), default=0.0)
            expected = 10 * loads + self.root.longest
        else:
            expected = next((node.longest for node in reversed(nodes) if node.longest), 0.0)
        return bool(self.root.longest) and now - started > 2 * expected

    def _load_seconds(self, level):
        """The mean load of a move that leaves the previous prefix at
        ``level`` (converting every changed value from there down); None
        before one was measured."""
        learned = self._loads.get(level)
        return learned[0] / learned[1] if learned else None

    def _running_time_left(self, node, level):
        """{child index: the time its held tasks have left} for the children
        of ``node``, the node at ``level``; estimated from means, and an
        overdue task is guessed to need as long again as it has run past its
        expected end (durations are often heavy-tailed, and a stuck task must
        not keep the others waiting for good)."""
        now, left = self.clock(), {}
        for held in self._busy.values():
            for nodes, held_level, given, task, _, _ in held:
                if len(nodes) > level + 1 and nodes[level] is node:
                    work = nodes[level + 1].task_seconds(0.0)
                    end = given + (self._load_seconds(held_level) or 0.0) + work
                    index = task[level]
                    left[index] = left.get(index, 0.0) + (
                        end - now if end > now else max(work, now - end))
        return left

    def _worth_joining(self, node, level, running):
        """Whether a worker that must load from ``level`` down should join the
        busy branch ``node``: only if it would finish the far-end task (its
        load, then one task) before the branch's own workers would finish the
        branch (their ``running`` time left, the tasks not started, and the
        loads of the sub-branches no one holds yet, shared among them).
        Waiting wrongly can cost far more than a load, so it joins while the
        branch's task time or the load is unmeasured."""
        load, work = self._load_seconds(level), node.task_seconds()
        if not load or work is None:
            return True
        left = running + node.remaining * work
        if isinstance(node.children, dict):
            untouched = sum(1 for child in node.children.values()
                            if child.remaining and not child.active)
            left += untouched * (self._load_seconds(level + 1) or 0.0)
        return load + work < left / node.active

    def release(self, key, newest=False, seconds=None, load=0.0):
        """The (oldest) task of worker ``key`` has ended (succeeded, failed or
        died).  ``seconds``: how long it took, ``load`` of which went to
        converting changed values.  Returns the levels at which taking it was
        a join and the nodes it entered first."""
        held = self._busy.get(key)
        if not held:
            return (), ()
        nodes, level, _, task, joins, firsts = held.pop(-1 if newest else 0)
        if held and not newest:   # the task queued behind it starts now
            held[0] = held[0][:2] + (self.clock(),) + held[0][3:]
        work = None if seconds is None else max(0.0, seconds - load)
        for node in nodes:
            node.active -= 1
            if work is not None:
                node.worked += work
                node.finished += 1
                if work > node.longest:
                    node.longest = work
        if work is not None:
            self._note_spread(key, work if level == self.depth - 1 else None)
        # A branch goes when its last task is done, not when its last task is
        # handed out: a task put back finds it with its workers still counted.
        for depth in range(len(nodes) - 1, 0, -1):
            node, parent = nodes[depth], nodes[depth - 1]
            if node.active or node.remaining or parent.children.get(task[depth - 1]) is not node:
                break
            del parent.children[task[depth - 1]]
        if not held:
            del self._busy[key]
        if seconds is not None:
            learned = self._loads.setdefault(level, [0.0, 0, 0.0])
            learned[0] += load
            learned[1] += 1
            learned[2] = max(learned[2], load)
        return joins, firsts

    def _note_spread(self, key, work):
        """What ``_may_join`` reads the spread of task times from: the
        difference of two tasks in a row by one worker with the same prefix,
        relative to their mean (for independent times, half its square is
        the squared coefficient of variation on average).  ``work`` is None
        after a move: the first task of a prefix may carry one-off costs (a
        model loaded inside task_method, say), and tasks under another prefix
        may differ for a reason."""
        previous = self._steady.get(key)
        if work is None:
            self._steady.pop(key, None)
            return
        self._steady[key] = work
        if previous is not None and previous + work > 0:
            self._spread[0] += 2 * ((work - previous) / (previous + work)) ** 2
            self._spread[1] += 1

    def put_back(self, key, indices):
        """Worker ``key`` never started the task it was given last: it waits
        again, and the worker holds what its task before that left it (a
        join it made to get it is undone: nothing was loaded)."""
        joins, firsts = self.release(key, newest=True)
        for level in joins:
            self._joins[level] -= 1
        for node in firsts:
            node.entered = bool(node.active)
        self.add(indices)
        if self._last.get(key) == tuple(indices):
            self._last[key] = self._before.pop(key, ())

    def forget(self, key):
        while key in self._busy:
            self.release(key)
        for table in (self._last, self._before, self._reverse, self._steady):
            table.pop(key, None)


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


def _check_case_collisions(variable_set, path):
    for variable in variable_set.variables:
        seen = {}
        for folder in variable.all_folders():
            other = seen.setdefault(folder.lower(), folder)
            if other != folder:
                raise ConfigError(
                    "variable %r: folders %r and %r differ only in case, and this filesystem "
                    "ignores case, so two tasks would share a folder; give them distinct "
                    "nicknames" % (variable.name, other, folder), _display_path(path))


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
    """'file:line' where the module-level setting ``name`` is assigned."""
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
    ignored without a word; the user's own constants (DATA_DIR) are fine."""
    filename = os.path.basename(path)
    assigned = _assigned_names(path)
    present = {name for name, _ in assigned}
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
    """The three project files of DIR/threadward, loaded and checked."""

    def __init__(self, directory):
        self.directory = os.path.abspath(directory)
        self.config_dir = os.path.join(self.directory, PROJECT_SUBDIR)
        self.queue_dir = os.path.join(self.config_dir, "task_queue")
        self.output_dir = os.path.join(self.config_dir, "task_outputs")
        self.worker_log_dir = os.path.join(self.config_dir, "worker_logs")
        self.status_file = os.path.join(self.queue_dir, "status.json")

    def path(self, filename):
        return os.path.join(self.config_dir, filename)

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
        self.success_condition = _choice_setting(module, path, "SUCCESS_CONDITION",
                                                 SUCCESS_CONDITIONS)
        self.output_mode = _choice_setting(module, path, "OUTPUT_MODE", OUTPUT_MODES)
        self.sigterm_grace = _number_setting(module, path, "SIGTERM_GRACE", SIGTERM_GRACE, 0)
        self.task_timeout = _number_setting(module, path, "TASK_TIMEOUT", None, 0.001,
                                            allow_none=True)
        self.task_module = module
        return module

    def load_variable_module(self):
        path = self.path("variable_iteration.py")
        module = _load_user_module(path, "variable_iteration")
        if not callable(getattr(module, "setup_variable_set", None)):
            raise ConfigError("setup_variable_set(variable_set) is not defined; it declares "
                              "the variables to iterate over", _display_path(path))
        _check_hooks(module, path, RESULT_HOOKS)
        self.failure_handling = _choice_setting(module, path, "FAILURE_HANDLING",
                                                FAILURE_HANDLINGS)
        self.folder_location = _choice_setting(module, path, "TASK_FOLDER_LOCATION",
                                               FOLDER_LOCATIONS)
        self.variable_module = module
        return module

    def load(self):
        """Load and check everything `run` needs; ConfigError on any mistake."""
        self.load_task_module()
        self.load_variable_module()
        path = self.path("resource_constraints.py")
        constraints = _load_user_module(path, "resource_constraints")
        for filename in CONFIG_FILES:
            _check_setting_names(self.path(filename))
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
        self._load_launcher(constraints, path)
        self.variable_set = self._build_variable_set()

    def _load_launcher(self, constraints, path):
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
        return variable_set

    def converters(self):
        """{variable name: NAME_to_value function} defined in variable_iteration.py."""
        module = self.variable_module
        return {name[:-len("_to_value")]: getattr(module, name) for name in dir(module)
                if name.endswith("_to_value") and callable(getattr(module, name))}


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


def _worker_argv(worker_id, directory, report_stats=False):
    """This very file in worker mode (a vendored copy loads itself)."""
    return [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__), WORKER_MODE,
            directory, str(worker_id)] + (["--report-stats"] if report_stats else [])


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
        argv = _worker_argv(worker.worker_id, directory, report_stats=self.indirect)
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
    """(CPU %, RSS bytes) summed over ``pids``.  ``known`` keeps the
    psutil.Process of each PID between samples: cpu_percent measures since
    the previous call on the same object."""
    cpu = rss = 0.0
    for pid in pids:
        try:
            process = known.get(pid)
            if process is None:
                process = known[pid] = psutil.Process(pid)
            cpu += process.cpu_percent(None)
            rss += process.memory_info().rss
        except psutil.Error:
            known.pop(pid, None)
    return int(round(cpu)), int(rss)


def _update_stat(stats, name, value):
    stats[name] = value
    if value is not None:
        stats[name + "_max"] = max(value, stats.get(name + "_max") or 0)


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
# Worker (the parent's handle on one subprocess) ##############################
###############################################################################

class Worker:
    """The main process's handle on one worker subprocess."""

    STARTING, IDLE, BUSY, STOPPING, EXITED = "starting", "idle", "busy", "stopping", "exited"

    def __init__(self, worker_id, slot, place):
        self.worker_id = worker_id
        self.slot = slot              # index of its _Slot; a replacement reuses it
        self.host = place.host        # None: this machine
        self.gpus = place.gpus        # tuple of CUDA_VISIBLE_DEVICES entries
        self.remote_pid = None        # as the worker reports it (not the launcher's)
        self.reports_stats = False    # True: the worker sends its own figures
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.state = self.STARTING
        self.queue = collections.deque()   # tasks sent and not answered; the first runs
        self.cancelling = set()       # IDs of queued tasks a CANCEL line is taking back
        self.last_seconds = None      # how long its last task took (the worker's clock)
        self.retiring = False         # `remove N`: no new task, then SHUT_DOWN
        self.waiting = None           # idle, no task worth its load: when it asks again
        self.terminated = False       # SIGTERM from outside ended its task
        self.timed_out = None         # the task TASK_TIMEOUT ended it for
        self.fatal = None             # start-up traceback sent by the worker
        self.end_reason = None        # why threadward ended it ("timeout"), if it did
        self.process = None
        self.pid = None
        self.returncode = None
        self.deadline = None          # (monotonic time, action) for timeouts and kills
        self.stats = {}               # monitoring: current and max figures
        self._buffer = _LineBuffer()
        self._stderr_buffer = _LineBuffer()

    def __repr__(self):
        return "Worker(%d, %s, pid=%s)" % (self.worker_id, self.state, self.pid)

    @property
    def task(self):
        """The task it is running (the oldest one sent and not answered)."""
        return self.queue[0] if self.queue else None

    def start(self, argv, env, directory, capture_stderr=False):
        """Start the worker (or its launcher) in a process group of its own, so
        that Ctrl-C in the terminal reaches only the main process."""
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if capture_stderr else None,
            cwd=directory, env=env, start_new_session=True)
        self.pid = self.process.pid

    def read_stderr(self):
        """Complete lines of the launcher's stderr now readable; None at its end."""
        try:
            data = os.read(self.process.stderr.fileno(), READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            tail = self._stderr_buffer.close()
            return None if not tail else [tail]
        return self._stderr_buffer.feed(data)

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
        """Lock, or raise naming the run that holds it; returns the holder
        a crashed run left in the file ("" if none)."""
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
        return previous

    def release(self):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)   # emptied first: a next run sees a clean hand-over
            os.close(self._fd)          # closing lets go of the lock
            self._fd = None


###############################################################################
# Threadward (the orchestrator) ###############################################
###############################################################################

class Threadward:
    """Runs a project: ``Threadward(directory).run()`` returns the exit code."""

    def __init__(self, directory=".", fresh=False, dry_run=False, stdin_fd=0, out=None):
        self.project = _Project(directory)
        self.fresh = fresh
        self.dry_run = dry_run
        self._stdin_fd = stdin_fd
        self._out = out or sys.stdout
        self._selector = None
        self._workers = {}            # worker id -> Worker (until reaped)
        self._hooks = {}              # on_task_success / on_task_failure, once looked up
        self._next_worker_id = 0
        self._free_slots = []         # indexes of slots not held by a worker
        self._slots = []              # every _Slot: where a worker may run, with its GPUs
        self._starting = 0            # how many workers start at once
        self._launcher = None
        self._gpu_uuids = {}          # CUDA_VISIBLE_DEVICES entry -> GPU UUID
        self._monitor = None
        self._next_sample = None
        self._start_failures = collections.Counter()   # slot -> failed starts in a row
        self._stopping = None         # None, or why no new tasks are handed out
        self._interrupting = False
        self._hook_failed = False
        self._stop_deadline = None    # SIGTERM: when running tasks are ended
        self._pending_starts = []     # (when, slot): retries of workers that failed to start
        self._own_children = set()    # processes of before_all_tasks: not orphans
        self._orphans = _Orphans()    # what workers that died left running

        self._wakeup = None
        self._old_signals = {}
        self._result_fds = {}
        self._unwritten = {}          # result file name -> lines not yet written
        self.succeeded = self.failed = self.skipped = 0
        self._finish_at = None        # the estimated end of the sweep (monotonic)
        self._lock = None
        self.total = 0
        self._durations_sum = 0.0
        self._durations_max = 0.0
        self._started = None
        self._last_progress = (0.0, 0)

    # -- public entry -------------------------------------------------------

    def run(self):
        """Run the project; returns the exit code (ConfigError before anything runs)."""
        if not os.path.isdir(self.project.directory):
            raise ConfigError("%s is not a directory; give the project directory (the one "
                              "holding threadward/)" % self.project.directory)
        # The main-process hooks see what the workers see: the project as the
        # working directory and on sys.path.
        previous = os.getcwd()
        os.chdir(self.project.directory)
        sys.path.insert(0, self.project.directory)
        sys.path.append(self.project.config_dir)   # for spawned children, as in workers
        try:
            return self._run()
        finally:
            os.chdir(previous)
            sys.path.remove(self.project.directory)
            sys.path.remove(self.project.config_dir)

    def _run(self):
        project = self.project
        project.load()
        self._plan_workers()
        if self.dry_run:
            return self._print_dry_run()
        os.makedirs(project.queue_dir, exist_ok=True)
        self._lock = _RunLock(os.path.join(project.queue_dir, "run.lock"))
        taken_over = self._lock.acquire()
        if taken_over:
            self._say("taking over from a run that ended without letting go of the "
                      "project (%s)%s" % (taken_over, "" if " on %s since " % os.uname().nodename
                                          in taken_over else "; if it is still going on "
                                          "there, stop this one: locks on this filesystem may "
                                          "not reach across hosts"))
        try:
            return self._run_locked()
        finally:
            self._lock.release()

    def _run_locked(self):
        project = self.project
        self._prepare_queue()
        if not self.total:
            self._say("all %d tasks already succeeded; nothing to run (--fresh runs them "
                      "again)" % self.skipped)
            return EXIT_OK
        self._cap_workers()
        self._started = time.monotonic()
        self._say("%s%s on %s%s; task output in %s" % (
            "%d of %d tasks already succeeded; running " % (
                self.skipped, self.skipped + self.total) if self.skipped else "running ",
            _plural(self.total, "task"), _plural(self._starting, "worker"),
            self._gpu_summary(), _display_path(project.output_dir)))
        self._open_result_files()
        self._selector = _Selector()
        self._monitor = _Monitor(self._selector, self._gpu_uuids)
        self._next_sample = self._started + STATUS_INTERVAL
        try:
            self._install_signal_handlers()
            self._register_console()
            _become_subreaper()
            if not self._call_main_hook("before_all_tasks"):
                self._stop("before_all_tasks raised")
                return self._print_summary()
            self._own_children = _child_pids()
            try:
                self._start_workers()
                self._loop()
                if len(self.scheduler):
                    self._stop("no worker left to run the remaining tasks")
            finally:
                self._stop_all_workers()
                self._write_results()
                if not self._call_main_hook("after_all_tasks"):
                    self._hook_failed = True
        finally:
            self._restore_signal_handlers()
            self._orphans.reap(until=time.monotonic() + KILL_WAIT)
            _become_subreaper(False)   # a library caller's process is left as it was
            self._monitor.close()
            self._write_status("finished")
            self._selector.close()
            for fd in self._result_fds.values():
                os.close(fd)
        return self._print_summary()

    # -- preparing ----------------------------------------------------------

    def _plan_workers(self):
        self._launcher = _Launcher(self.project)
        self._launcher.check_available()
        self._slots, self._starting, self._gpu_uuids = self._launcher.plan_slots()
        self._launcher.plan_cpus(self._starting)
        self._free_slots = list(range(len(self._slots)))

    def _cap_workers(self):
        """Never more workers than tasks to run (each costs a Python start
        and its memory before any task runs); the CPU share follows."""
        project = self.project
        if self._starting > self.total:
            self._say("NUM_WORKERS = %d, but only %s to run: starting %d workers" % (
                project.num_workers, _plural(self.total, "task"), self.total))
            self._starting = self.total
            self._launcher.plan_cpus(self._starting)
        cores = len(self._launcher.cores)
        if self._launcher.kind == "local" and not project.gpus_per_worker and \
                self._starting > cores:
            self._say("note: %d workers on %d cores and no GPUs: they will share the cores"
                      % (self._starting, cores))

    def _gpu_summary(self):
        project = self.project
        hosts = sorted({slot.host for slot in self._slots if slot.host})
        where = " on %s" % ", ".join(hosts) if hosts else (
            " as Slurm job steps" if self._launcher.kind == "slurm" else "")
        if not project.gpus_per_worker:
            return where + ", CPU only"
        if self._launcher.kind == "slurm":
            return where + ", %s GPU per worker chosen by Slurm" % project.gpus_per_worker
        used = sorted({g for slot in self._slots[:self._starting] for g in slot.gpus})
        return where + ", GPUs %s" % ",".join(used)

    def _task_of(self, indices):
        task_id = _task_id(self.project.variable_set.folder_names(indices),
                           self.project.folder_location)
        return Task(task_id, indices, self.project.output_dir + os.sep + task_id)

    def _read_succeeded(self):
        path = os.path.join(self.project.queue_dir, "successful_tasks.txt")
        try:
            with open(path, "rb") as stream:
                data = stream.read()
        except FileNotFoundError:
            return set()
        lines = data.split(b"\n")
        lines.pop()   # empty after a final newline; a torn last line otherwise
        return {line.decode("utf-8", "replace") for line in lines if line}

    def _prepare_queue(self):
        """Expand, check IDs, stream all_tasks.json, fill the scheduler."""
        project = self.project
        variable_set = project.variable_set
        os.makedirs(project.queue_dir, exist_ok=True)
        if _case_insensitive(project.queue_dir):
            _check_case_collisions(variable_set, project.path("variable_iteration.py"))
        succeeded = set() if self.fresh else self._read_succeeded()
        scheduler = _Scheduler(len(variable_set.variables))
        path = os.path.join(project.queue_dir, "all_tasks.json")
        temporary = "%s.tmp%d" % (path, os.getpid())
        _remove_stale_temporaries(project.queue_dir)   # ours alone: we hold the lock
        try:
            self._write_task_list(temporary, scheduler, succeeded)
            os.replace(temporary, path)
        except BaseException as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            if isinstance(exc, OSError):   # a full disk, a quota, `ulimit -f`
                raise ThreadwardError("cannot write %s: %s; nothing was run (free space, "
                                      "then run again)"
                                      % (_display_path(path), exc.strerror or exc))
            raise
        self.scheduler = scheduler
        self.total = len(scheduler)

    def _write_task_list(self, temporary, scheduler, succeeded):
        project = self.project
        variable_set = project.variable_set
        location = project.folder_location
        output_root = os.path.relpath(project.output_dir, project.directory)
        # One variable's IDs are its folders, distinct already (add_variable).
        check_ids = location == "VARIABLE_UNDERSCORE" and len(variable_set.variables) > 1 \
            and any("_" in folder for v in variable_set.variables for folder in v.all_folders())
        seen_ids = set()
        with open(temporary, "w", buffering=1 << 20) as stream:
            stream.write("[")
            separator = "\n"
            for indices in variable_set.iter_indices():
                task_id = _task_id(variable_set.folder_names(indices), location)
                if check_ids:
                    if task_id in seen_ids:
                        raise ConfigError(
                            "two tasks would share the ID and folder %r (folder names joined "
                            "with \"_\" collide); use TASK_FOLDER_LOCATION = "
                            "\"VARIABLE_SUBFOLDER\" or nicknames without \"_\"" % task_id,
                            _display_path(project.path("variable_iteration.py")))
                    seen_ids.add(task_id)
                if location == "VARIABLE_UNDERSCORE" and len(task_id.encode()) > 255:
                    raise ConfigError(
                        "the folder name %r is longer than a filesystem allows (255 bytes); "
                        "use shorter nicknames or TASK_FOLDER_LOCATION = \"VARIABLE_SUBFOLDER\""
                        % task_id, _display_path(project.path("variable_iteration.py")))

                stream.write('%s{"task_id": %s, "task_folder": %s, "variables": %s}' % (
                    separator, json.dumps(task_id), json.dumps(output_root + "/" + task_id),
                    variable_set.json_fragment(indices)))
                separator = ",\n"
                if task_id in succeeded:
                    self.skipped += 1
                else:
                    scheduler.add(indices)
            stream.write("\n]\n")

    def _open_result_files(self):
        for name in RESULT_FILES:
            path = os.path.join(self.project.queue_dir, name)
            truncate = self.fresh or name == "failed_tasks.txt"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND |
                         (os.O_TRUNC if truncate else 0), 0o666)
            self._result_fds[name] = fd
            self._drop_torn_line(fd)

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

    def _print_dry_run(self):
        project = self.project
        variable_set = project.variable_set
        count, shown = 0, []
        for indices in variable_set.iter_indices():
            count += 1
            if len(shown) < 10:
                shown.append(self._task_of(indices))
        self._say("dry run: %d tasks; nothing is started" % count)
        for task in shown:
            self._say("  %-40s %s" % (task.task_id, _display_path(task.folder)))
        if count > len(shown):
            self._say("  ... and %d more" % (count - len(shown)))
        self._say("  CPU: %s" % self._launcher.cpu_summary())
        for number, slot in enumerate(self._slots[:self._starting]):
            self._say("  worker %d%s: CUDA_VISIBLE_DEVICES=%s%s" % (
                number, " on %s" % slot.host if slot.host else "",
                "(chosen by Slurm)" if self._launcher.kind == "slurm" and
                project.gpus_per_worker else ",".join(slot.gpus) or '""',
                ", cores %s" % ",".join(map(str, self._launcher.cores_of(number)))
                if project.pin_cpus else ""))
        reserve = len(self._slots) - self._starting
        if project.gpus_per_worker and reserve > 0:
            self._say("  %d more worker slots in reserve for `add`" % reserve)
        return EXIT_OK

    # -- the loop -----------------------------------------------------------

    def _loop(self):
        while self._workers or self._pending_starts:
            self._wait_for_events()
            if time.monotonic() >= self._next_deadline:
                self._expire_deadlines()
            self._reap_workers()
            self._assign_tasks()
            self._report_progress()
            self._write_results()

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
        deadlines.extend(when for when, _ in self._pending_starts)
        for deadline in (self._stop_deadline, self._monitor.deadline()):
            if deadline:
                deadlines.append(deadline)
        # Deadlines set while handling events lie in the future: the next
        # select sees them, and _expire_deadlines can wait until this one.
        self._next_deadline = min(deadlines)
        return max(0.0, self._next_deadline - now)

    def _expire_deadlines(self):
        now = time.monotonic()
        for when, slot in list(self._pending_starts):
            if now >= when:
                self._pending_starts.remove((when, slot))
                if self._stopping or not len(self.scheduler):
                    self._free_slots.append(slot)
                else:
                    self._start_worker(slot)
        if self._stop_deadline and now >= self._stop_deadline:
            self._stop_deadline = None
            self._say("grace period over; ending running tasks")
            self._interrupt_running()
        for worker in list(self._workers.values()):
            if worker.deadline and now >= worker.deadline[0]:
                action = worker.deadline[1]
                worker.deadline = None
                action(worker)
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

        if any(w.gpus for w in workers):
            self._monitor.start_gpu_query(self._watched_workers)
        self._write_status("running")

    def _write_status(self, state):
        try:
            _atomic_write(self.project.status_file, json.dumps({
                "state": state, "pid": os.getpid(), "updated": time.time(),
                "show": self._show_table()}, indent=1) + "\n")
        except OSError as exc:
            self._say("could not write %s: %s" % (self.project.status_file, exc))

    # -- workers: start, read, reap -----------------------------------------

    def _start_workers(self):
        for _ in range(self._starting):
            self._start_worker(self._free_slots.pop(0))

    def _start_worker(self, slot):
        worker = Worker(self._next_worker_id, slot, self._slots[slot])
        self._next_worker_id += 1
        argv, env = self._launcher.command(worker, self.project.directory)
        # A launcher's own messages (srun, ssh) go through us: shown with the
        # worker's number, and kept to explain a worker that fails to start.
        try:
            os.makedirs(self.project.worker_log_dir, exist_ok=True)
            worker.start(argv, env, self.project.directory,
                         capture_stderr=self._launcher.indirect)
        except OSError as exc:   # too many open files, a launcher gone since start-up
            worker.fatal = "could not run %s: %s" % (argv[0], exc)
            self._on_start_failure(worker, "it could not be started")
            return None
        worker.reports_stats = self._launcher.indirect
        self._workers[worker.worker_id] = worker
        self._selector.register(worker.fileno(), selectors.EVENT_READ,
                                lambda: self._on_worker_readable(worker))
        if worker.process.stderr is not None:
            os.set_blocking(worker.process.stderr.fileno(), False)
            self._selector.register(worker.process.stderr.fileno(), selectors.EVENT_READ,
                                    lambda: self._on_worker_stderr(worker))
        return worker

    def _on_worker_stderr(self, worker):
        if worker.process.stderr.closed:
            return   # a stale event from the same select(), after the pipes closed
        lines = worker.read_stderr()

        if lines is None:
            self._selector.unregister(worker.process.stderr.fileno())
            worker.process.stderr.close()
            return
        try:
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip()
                worker.stderr_tail.append(text)
                sys.stderr.write("[worker %d] %s\n" % (worker.worker_id, text))
            sys.stderr.flush()
        except (OSError, ValueError):
            self._terminal_gone()

    def _on_worker_readable(self, worker):
        lines, ended = worker.read_lines()
        for line in lines:
            self._on_worker_line(worker, line)
        if ended:
            self._selector.unregister(worker.fileno())
            stderr = worker.process.stderr
            if stderr is not None and not stderr.closed:
                self._on_worker_stderr(worker)   # what the launcher said as it ended
                if not stderr.closed:
                    self._selector.unregister(stderr.fileno())
            worker.close_pipes()
            if worker.poll() is None:
                worker.deadline = (time.monotonic() + KILL_WAIT, self._kill_worker)
            else:
                self._on_worker_exit(worker)

    def _on_worker_line(self, worker, line):
        try:
            message = _json_decode(line.decode("utf-8"))
            if not isinstance(message, dict):
                raise ValueError
        except ValueError:
            # e.g. a login script printing on the ssh session before the worker starts
            _stderr("ignored a line from worker %d that is not a protocol message: %r"
                    % (worker.worker_id, line[:200]))
            return
        op = message.get("op")
        if op == "ready":
            worker.state = Worker.IDLE
            self._start_failures[worker.slot] = 0
            worker.remote_pid = message.get("pid")
            worker.host = worker.host or (message.get("host") if self._launcher.indirect
                                          else None)
            if not worker.gpus and message.get("gpus"):   # Slurm chose them
                worker.gpus = tuple(message["gpus"].split(","))
        elif op == "stats":
            for name in ("cpu", "rss", "gpu"):
                if name in message:
                    _update_stat(worker.stats, name, message[name])
        elif op == "result" and worker.queue:
            task = self._next_in_queue(worker)
            success, reason = message.get("status") == 0, message.get("reason") or ""
            # The scheduler learns from tasks that ran to their end.
            self.scheduler.release(worker.worker_id, seconds=message.get("seconds") if success
                                   else None, load=message.get("load", 0.0))
            worker.last_seconds = message.get("seconds")
            ours = worker.end_reason or self._interrupting   # the SIGTERM came from us
            if message.get("terminated"):
                worker.state = Worker.STOPPING   # it exits after this line: no new task
                self._put_back_queued(worker, keep_running=False)
                worker.terminated = not ours   # from someone else: it is not replaced
            if not success and ours:
                if worker.timed_out not in (None, task):
                    # The task that timed out ended just before our SIGTERM,
                    # which reached the next one: that one is run again.
                    self.scheduler.add(task.indices)
                    return
                reason = worker.end_reason or "interrupted"   # we ended it, and know why
            elif not success and message.get("terminated"):
                reason = "interrupted"
            self._record(task, success, reason, message.get("seconds"))
        elif op == "cancelled":
            self._on_cancelled(worker, message.get("id"))
        elif op == "terminated":   # a SIGTERM between tasks: it exits, starting nothing
            worker.state = Worker.STOPPING
            worker.terminated = not (worker.end_reason or self._interrupting)
            self._put_back_queued(worker, keep_running=False)
        elif op == "fatal":
            worker.fatal = message.get("error") or "unknown error"

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
        previous = worker.state
        worker.state = Worker.EXITED
        worker.deadline = None
        del self._workers[worker.worker_id]
        if worker.returncode != 0 and self._launcher.kind == "local":
            # It died: what its tasks started came to us.
            self._orphans.end(self._own_children | self._monitor.pids() | {
                other.pid for other in self._workers.values()})
        self._put_back_queued(worker)   # first: what was queued undoes its joins
        self.scheduler.forget(worker.worker_id)
        reason = worker.exit_reason()
        if worker.queue:
            task = worker.queue.popleft()
            self._record(task, False, "interrupted" if self._interrupting
                         else worker.end_reason or reason)
            self._show_log_tail(task)
        if previous == Worker.STARTING:
            self._on_start_failure(worker, reason)
            return
        if worker.retiring or worker.terminated or (
                previous == Worker.STOPPING and not worker.end_reason):
            if worker.terminated and not self._stopping:
                self._say("worker %d was stopped by a SIGTERM from outside threadward; it is "
                          "not replaced (`add` starts another)" % worker.worker_id)
            self._free_slots.append(worker.slot)
            self._free_slots.sort()
            return
        self._replace_worker(worker, reason)

    def _on_start_failure(self, worker, reason):
        self._start_failures[worker.slot] += 1
        failures = self._start_failures[worker.slot]
        detail = worker.fatal or "\n".join(worker.stderr_tail) or \
            "%s before it was ready" % reason
        self._say("worker %d could not start (%s):\n%s" % (
            worker.worker_id, reason, "    " + detail.rstrip().replace("\n", "\n    ")))
        if self._stopping or not len(self.scheduler):
            self._free_slots.append(worker.slot)
            return
        if failures >= MAX_START_FAILURES:
            self._say("giving up worker slot %d after %d failed starts in a row"
                      % (worker.slot, failures))
            if not self._workers and not self._pending_starts:
                self._stop("no worker could start")
            return
        self._pending_starts.append((time.monotonic() + failures * START_RETRY_DELAY,
                                     worker.slot))

    def _replace_worker(self, worker, reason):
        if self._stopping or not len(self.scheduler):
            self._free_slots.append(worker.slot)
            return
        replacement = self._start_worker(worker.slot)
        if replacement is not None:
            self._say("%s; started worker %d in its place" % (reason, replacement.worker_id))

    def _kill_worker(self, worker):
        if worker.poll() is None:
            # Its descendants first: those in sessions of their own are not in its group.
            _kill_descendants(worker.pid)
        worker.signal_group(signal.SIGKILL)
        if worker.process.stdout.closed and worker.poll() is None:
            # SIGKILL cannot be ignored; the reap after SIGCHLD finishes the job.
            worker.deadline = (time.monotonic() + KILL_WAIT, self._kill_worker)

    def _end_worker(self, worker, reason=None):
        """SIGTERM the worker's process group now, SIGKILL after KILL_WAIT."""
        if reason:
            worker.end_reason = reason
        worker.signal_group(signal.SIGTERM)
        worker.deadline = (time.monotonic() + KILL_WAIT, self._kill_worker)

    def _show_log_tail(self, task):
        try:
            with open(task.log_file, "rb") as stream:
                stream.seek(max(0, os.fstat(stream.fileno()).st_size - 4096))
                lines = stream.read().decode("utf-8", "replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return
        if lines and self.project.failure_handling != "SILENT_CONTINUE":
            self._say("  last lines of %s:\n    %s"
                      % (_display_path(task.log_file), "\n    ".join(lines)))

    # -- handing out tasks --------------------------------------------------

    def _assign_tasks(self):
        workers = list(self._workers.values())
        # Idle workers first: they wait, busy ones do not.  A worker may wait
        # for a task worth its load only while another holds one (an event is
        # then sure to come, also when it was given in this pass); it asks
        # again at the first pass WAIT_RECHECK after, and the sample timer
        # makes a pass at least every STATUS_INTERVAL.
        idle = [w for w in workers if w.state == Worker.IDLE]
        holding = idle and any(worker.queue for worker in workers)
        now = time.monotonic()
        for worker in self._asking_order(idle):
            if self._stopping or worker.retiring:
                self._shut_down(worker)
            elif worker.waiting is not None and now < worker.waiting and len(self.scheduler):
                continue
            elif self._send_task(worker, patient=holding):
                worker.waiting = None
                holding = True
            elif len(self.scheduler):
                worker.waiting = now + WAIT_RECHECK
            else:
                worker.waiting = None
                if not self._take_back_queued():
                    self._shut_down(worker)   # nothing left, here or queued elsewhere
        for worker in workers:
            if worker.state == Worker.BUSY and self._queues_ahead(worker):
                self._send_task(worker)

    def _asking_order(self, idle):
        """Those told to wait ask last; of those that have just answered, the
        one with the most of its branch left asks first, again after each
        ask (a task given may end another's branch): a branch's own workers
        are back in it before another could find it free and join it
        unchecked."""
        answered = [worker for worker in idle if worker.waiting is None]
        while answered:
            worker = max(answered, key=lambda w: self.scheduler.kept(w.worker_id))
            answered.remove(worker)
            yield worker
        for worker in idle:
            if worker.waiting is not None:
                yield worker

    def _queues_ahead(self, worker):
        return (len(worker.queue) == 1 and not worker.cancelling and not worker.retiring
                and not worker.process.stdout.closed   # it is gone, not yet reaped
                and not self._stopping and worker.last_seconds is not None
                and worker.last_seconds < QUEUE_AHEAD_BELOW
                # STOP_EXECUTION: a task queued ahead would start before the
                # failure of the one before it is known here.
                and self.project.failure_handling != "STOP_EXECUTION")

    def _send_task(self, worker, patient=True):
        """Give ``worker`` its next task (queued if it is busy); False if none
        is left or (``patient``: others are working) none is worth its load."""
        indices = self.scheduler.assign(worker.worker_id, ahead=bool(worker.queue),
                                        patient=patient)
        if indices is None:
            return False
        task = self._task_of(indices)
        worker.queue.append(task)
        if len(worker.queue) == 1:
            self._task_started(worker)
        # If the worker is gone, the send fails and its exit records the task.
        worker.send(task.message(self.project.variable_set))
        return True

    def _task_started(self, worker):
        """The first task of its queue runs from now (the answer to the one
        before has just come, or it was idle)."""
        task = worker.queue[0]
        task.started = time.monotonic()
        worker.state = Worker.BUSY
        worker.deadline = None
        if self.project.task_timeout:
            worker.deadline = (task.started + self.project.task_timeout,
                               lambda w, task=task: self._on_timeout(w, task))

    def _on_timeout(self, worker, task):
        # Its answer may be waiting unread: if the task has ended after all,
        # the SIGTERM would only hit the next one.
        if not worker.process.stdout.closed and _readable_now(worker.fileno()):
            self._on_worker_readable(worker)
        if worker.task is task:
            worker.timed_out = task
            self._end_worker(worker, "timeout")

    def _next_in_queue(self, worker):
        """The worker has answered its running task: the next one in its queue
        starts, or it is idle."""
        task = worker.queue.popleft()
        worker.cancelling.discard(task.task_id)
        if worker.queue:
            self._task_started(worker)
        else:
            worker.state = Worker.IDLE
            worker.deadline = None
        return task

    def _on_cancelled(self, worker, task_id):
        """A queued task the worker gave back unstarted (it may come before
        the result of the task running ahead of it)."""
        for position, task in enumerate(worker.queue):
            if task.task_id == task_id:
                break
        else:
            return
        if position == 0:
            self._next_in_queue(worker)
        else:
            del worker.queue[position]
            worker.cancelling.discard(task_id)
        self.scheduler.put_back(worker.worker_id, task.indices)
        worker.last_seconds = None   # not queued here again before its next result

    def _cancel_queued(self, worker, with_running=False):
        """Take back what the worker has not started: the tasks queued behind
        the running one and, ``with_running``, that one too in case its start
        is still ahead (its predecessor's result has just come).  A CANCEL
        line: each comes back "cancelled", or as a result if it had started.
        True while an answer is due for a task that was queued behind."""
        queued = {task.task_id for task in list(worker.queue)[1:]}
        if queued - worker.cancelling or (with_running and worker.queue):
            worker.cancelling |= queued
            worker.send((CANCEL + "\n").encode())
        return bool(worker.cancelling)

    def _take_back_queued(self):
        """An idle worker found nothing: tasks queued behind others' running
        ones come back to the scheduler (True if some may)."""
        waiting = False
        for other in self._workers.values():
            waiting = self._cancel_queued(other) or waiting
        return waiting

    def _put_back_queued(self, worker, keep_running=True):
        """Tasks a gone (or going) worker will never start return to the scheduler."""
        while len(worker.queue) > (1 if keep_running else 0):
            self.scheduler.put_back(worker.worker_id, worker.queue.pop().indices)
        worker.cancelling.clear()

    def _shut_down(self, worker):
        worker.state = Worker.STOPPING
        worker.waiting = None
        worker.send((SHUT_DOWN + "\n").encode())

    def _stop_all_workers(self):
        """Last resort on the way out (an exception, or workers still alive)."""
        for worker in list(self._workers.values()):
            worker.signal_group(signal.SIGKILL)
            worker.close_pipes()
            try:
                worker.process.wait(KILL_WAIT)
            except subprocess.TimeoutExpired:
                pass
            self._put_back_queued(worker)
            if worker.queue:
                self._record(worker.queue.popleft(), False, "interrupted")
        self._workers.clear()

    # -- results ------------------------------------------------------------

    def _record(self, task, success, reason, seconds=None):
        if seconds is None and task.started is not None:
            seconds = time.monotonic() - task.started
        if seconds is not None:
            self._durations_sum += seconds
            self._durations_max = max(self._durations_max, seconds)
        if success:
            self.succeeded += 1
            self._append("successful_tasks.txt", task.task_id)
        else:
            self.failed += 1
            reason = _one_line(reason) or "failed"
            self._append("failed_tasks.txt", "%s\t%s" % (task.task_id, reason))
            handling = self.project.failure_handling
            if handling != "SILENT_CONTINUE":
                self._say("FAILED %s: %s (log: %s)" % (task.task_id, reason,
                                                       _display_path(task.log_file)))
            if handling == "STOP_EXECUTION":
                self._stop("a task failed and FAILURE_HANDLING is STOP_EXECUTION")
        self._estimate_finish()
        hook = "on_task_success" if success else "on_task_failure"
        function = _hook_of(self._hooks, self.project.variable_module, hook)
        if function is not None:
            self._write_results()   # the line is on disk before the hook sees the task
            arguments = [self.project.variable_set.variables_of(task.indices), task.folder,
                         task.log_file] + ([] if success else [reason])
            try:
                function(*arguments)
            except Exception:
                self._say("%s raised (the run goes on):\n%s" % (hook, traceback.format_exc()))

    def _append(self, name, line):
        self._unwritten.setdefault(name, []).append(line)

    def _write_results(self):
        """Append the lines recorded since the last select to their files:
        whole lines, in one write per file (O_APPEND), so a crash leaves no
        half line, and a task whose line is lost is only run again."""
        unwritten, self._unwritten = self._unwritten, {}
        for name, lines in unwritten.items():
            try:
                _write_all(self._result_fds[name], ("\n".join(lines) + "\n").encode("utf-8"))
            except OSError as exc:
                self._say("cannot record %s in %s (%s); stopping: free space or fix "
                          "permissions, then run again" % (", ".join(lines), name, exc))
                self._stop("results cannot be written")

    # -- stopping -----------------------------------------------------------

    def _stop(self, why):
        """No new tasks; running tasks finish."""
        if self._stopping:
            return False
        self._stopping = why
        for worker in self._workers.values():
            self._cancel_queued(worker, with_running=True)
        return True

    def _interrupt_running(self):
        """End running tasks now; they are recorded as interrupted."""
        self._interrupting = True
        self._stop("interrupted")
        for worker in self._workers.values():
            if worker.state != Worker.IDLE:
                self._end_worker(worker)

    # -- signals ------------------------------------------------------------

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._wakeup = (read_fd, write_fd)
        self._old_signals["wakeup"] = signal.set_wakeup_fd(write_fd,
                                                           warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                    signal.SIGCHLD):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue   # `nohup threadward run`: the user asked to ride out a hang-up
            # The handler only records (via the wakeup fd); the loop acts.
            self._old_signals[sig] = signal.signal(sig, lambda signum, frame: None)
        self._selector.register(read_fd, selectors.EVENT_READ, self._on_signals)

    def _restore_signal_handlers(self):
        if self._wakeup is None:
            return
        signal.set_wakeup_fd(self._old_signals.pop("wakeup"))
        for sig, handler in self._old_signals.items():
            signal.signal(sig, handler)
        for fd in self._wakeup:
            os.close(fd)
        self._wakeup = None

    def _on_signals(self):
        try:
            data = os.read(self._wakeup[0], 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                continue   # the reap step that follows every wake-up does the work
            if signum == signal.SIGINT and self._stopping and not self._interrupting:
                self._say("second Ctrl-C: ending running tasks (recorded as interrupted)")
                self._interrupt_running()
            elif signum == signal.SIGUSR1:   # `kill -USR1 PID`: show, where no console is
                self._say(self._show_table())
            elif signum in (signal.SIGTERM, signal.SIGHUP) and not self._stop_deadline \
                    and not self._interrupting:
                # Even after `quit`: preemption gives a deadline we must keep.
                # SIGHUP (the terminal closed, ssh dropped) is handled alike.
                name = signal.Signals(signum).name
                grace = self.project.sigterm_grace
                self._stop("stopped by %s" % name)
                self._stop_deadline = time.monotonic() + grace
                self._say("%s: no new tasks; running tasks %s" % (
                    name, "may take as long as they need (SIGTERM_GRACE = inf)"
                    if grace == float("inf") else "get %gs to finish" % grace))
            elif signum == signal.SIGINT and not self._stopping:
                self._stop("stopped by SIGINT")
                self._say("stopping: no new tasks; running tasks finish "
                          "(press Ctrl-C again to stop running tasks)")

    # -- console ------------------------------------------------------------

    def _register_console(self):
        try:
            os.fstat(self._stdin_fd)
            self._selector.register(self._stdin_fd, selectors.EVENT_READ, self._on_console)
        except (OSError, ValueError):
            return   # no usable stdin (closed, or a kind poll refuses): no console
        self._console = _LineBuffer()

    def _on_console(self):
        try:
            data = os.read(self._stdin_fd, 4096)
        except OSError:
            data = b""
        if not data:
            # End of input ends the console only; the run goes on (nohup, sbatch).
            self._selector.unregister(self._stdin_fd)
            lines = [self._console.close()]   # `echo -n q |`: a last line without \n
        else:
            lines = self._console.feed(data)
        for line in lines:
            self._console_command(line.decode("utf-8", "replace").strip())

    def _console_command(self, line):
        words = line.split()
        if not words:
            return
        command, arguments = words[0].lower(), words[1:]
        if command in ("q", "quit"):
            if self._stop("quit"):
                self._say("quit: no new tasks; waiting for %d running task(s), then teardown"
                          % sum(1 for w in self._workers.values() if w.state == Worker.BUSY))
            else:
                self._say("already stopping (%s)" % self._stopping)
        elif command in ("s", "show"):
            self._monitor.sample(self._watched_workers())
            self._say(self._show_table())

        elif command in ("a", "add"):
            self._console_add()
        elif command in ("r", "remove"):
            self._console_remove(arguments)
        elif command in ("h", "help"):
            self._say(CONSOLE_HELP)
        else:
            self._say("unknown command %r; commands: show (s), quit (q), add (a), "
                      "remove N (r N), help (h)" % line)

    def _console_add(self):
        if self._stopping:
            self._say("add: not while stopping (%s)" % self._stopping)
        elif not len(self.scheduler):
            self._say("add: no tasks are waiting; nothing for a new worker to do")
        elif not self._free_slots and self.project.gpus_per_worker \
                and self._launcher.kind != "slurm":
            self._say("add: no GPUs left in reserve (every usable GPU share is held by a "
                      "worker); remove a worker or widen INCLUDE_GPUS")
        else:
            if not self._free_slots:   # nothing to reserve: one more like the first
                self._slots.append(self._slots[0])
                self._free_slots.append(len(self._slots) - 1)
            worker = self._start_worker(self._free_slots.pop(0))
            if worker is not None:
                self._say("add: started worker %d%s" % (worker.worker_id, " on GPU %s" % (
                    ",".join(worker.gpus)) if worker.gpus else ""))

    def _console_remove(self, arguments):
        try:
            worker = self._workers[int(arguments[0])]
        except (IndexError, ValueError, KeyError):
            self._say("remove: %s; running workers: %s" % (
                "no worker %s" % arguments[0] if arguments else "give a worker ID",
                ", ".join(str(i) for i in self._workers) or "none"))
            return

        worker.retiring = True
        self._cancel_queued(worker, with_running=True)

        self._say("remove: worker %d takes no new task%s" % (
            worker.worker_id, "; it finishes %s first" % worker.task.task_id
            if worker.task else ""))

    # -- reporting ----------------------------------------------------------

    def _say(self, message):
        try:
            self._out.write(message + "\n")
            self._out.flush()
        except (OSError, ValueError):
            self._terminal_gone()

    def _terminal_gone(self):
        """Our output can no longer be written (the terminal closed, the pipe's
        reader left): the run goes on silently; what it records is on disk."""
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)   # Python's flush at exit must not fail either
        os.close(null)
        self._out = open(os.devnull, "w")

    def _elapsed(self):
        return time.monotonic() - self._started

    def _eta(self):
        """Seconds left, from the finish time estimated at the last result:
        the progress line, `show` and status.json count down the same one."""
        if self._finish_at is None:
            return None
        return max(0.0, self._finish_at - time.monotonic())

    def _estimate_finish(self):
        done = self.succeeded + self.failed
        self._finish_at = time.monotonic() + self._elapsed() / done * (self.total - done)

    def _report_progress(self):
        done = self.succeeded + self.failed
        last_time, last_done = self._last_progress
        now = time.monotonic()
        tenths = done * 10 // self.total
        if tenths > last_done * 10 // self.total or (
                done != last_done and now - (last_time or self._started) >= PROGRESS_INTERVAL):
            self._last_progress = (now, done)
            self._say("[%s] %d/%d done, %d failed, ETA %s" % (
                _format_duration(self._elapsed()), done, self.total, self.failed,
                _format_duration(self._eta())))

    def _show_table(self):
        """The `show` view (also in status.json): fits 100 columns."""
        done = self.succeeded + self.failed
        lines = [
            "elapsed %s   ETA %s   per task: avg %s, max %s" % (
                _format_duration(self._elapsed()), _format_duration(self._eta()),
                "%.2fs" % (self._durations_sum / done) if done else "?",
                "%.2fs" % self._durations_max if done else "?"),
            "tasks: %d succeeded, %d failed, %d skipped (done before), %d remaining of %d" % (
                self.succeeded, self.failed, self.skipped, self.total - done,
                self.total + self.skipped),
            "CPU: %s" % self._launcher.cpu_summary(),
        ]
        # Remote workers show pid@host; the state column gives up the room.
        where_width = max([8] + [len(w.where()) for w in self._workers.values()])
        where_width = min(where_width, 20)
        state_width = 40 - where_width
        row = "%%3s  %%-%ds %%-7s %%-%ds %%11s  %%-13s %%s" % (where_width, state_width)
        remote = any(w.host for w in self._workers.values())
        if not self._workers:
            return "\n".join(lines)
        lines.append(row % ("ID", "PID@host" if remote else "PID", "GPUs", "state",
                            "CPU% now/max", "RAM now/max", "GPU mem now/max"))
        for worker in self._workers.values():
            state = worker.state
            if worker.task is not None:
                task_id = worker.task.task_id
                state = "busy %s %s" % (_format_duration(time.monotonic() - worker.task.started),
                                        _elide(task_id, state_width - 13))
            elif worker.waiting is not None:
                state = "idle: no task worth a load"
            if worker.retiring:
                state = "removing; " + state
            stats = worker.stats
            lines.append(row % (
                worker.worker_id, worker.where()[:where_width], ",".join(worker.gpus)[:7] or "-",
                state[:state_width],
                "%s/%s" % (stats.get("cpu", "?"), stats.get("cpu_max", "?")),
                "%s/%s" % (_format_bytes(stats.get("rss")), _format_bytes(stats.get("rss_max"))),
                "%s/%s" % (_format_bytes(stats.get("gpu")), _format_bytes(stats.get("gpu_max")))
                if worker.gpus else "-"))
        return "\n".join(lines)

    def _print_summary(self):
        stopped = self._stopping and len(self.scheduler)
        self._say("%s in %s: %d succeeded, %d failed%s%s" % (
            "stopped (%s)" % self._stopping if stopped else "done",
            _format_duration(self._elapsed()),
            self.succeeded, self.failed,
            ", %d not run" % len(self.scheduler) if len(self.scheduler) else "",
            ", %d skipped (already succeeded)" % self.skipped if self.skipped else ""))
        if self.failed:
            self._say("failed tasks are listed in %s; `threadward run` again retries them"
                      % _display_path(os.path.join(self.project.queue_dir,
                                                   "failed_tasks.txt")))
        if self._hook_failed:
            self._say("after_all_tasks raised (see above)")
        return EXIT_OK if not (self.failed or stopped or self._hook_failed) else EXIT_FAILED

    # -- main-process hooks -------------------------------------------------

    def _call_main_hook(self, name):
        """Run before_all_tasks or after_all_tasks; False (and the traceback
        on the console) if it raised."""
        function = getattr(self.project.task_module, name, None)
        try:
            if function is not None:
                function()
            return True
        except Exception:
            self._say("%s raised:\n%s" % (name, traceback.format_exc().rstrip()))
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
        pids = self.of_value.pop(name, set()) & _child_pids()
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
            _end_processes(_child_pids())


class _WorkerProcess:
    """Runs inside a worker subprocess: reads tasks, runs them, reports."""

    def __init__(self, project_dir, worker_id, report_stats=False):
        self.project = _Project(project_dir)
        self.worker_id = worker_id
        self.report_stats = report_stats   # launched elsewhere: say our own figures
        self._send_lock = threading.Lock()
        self._sigterm_raises = False
        self._sigterm_pending = False
        self._own_signal_at = None    # when a task last aimed os.kill/killpg at our group
        self._forked = False          # True in a process a task forked
        self.retained = {}            # variable name -> (value, nickname, converted)
        self.load_seconds = 0.0       # spent converting changed values for this task
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
        self._lines_lock = threading.Lock()  # the watchdog thread takes CANCELs too
        self._buffer = _LineBuffer()
        self._poller = select.poll()
        self._poller.register(self.channel_in, select.POLLIN)

    def send(self, message):
        _write_all(self.channel_out, (json.dumps(message) + "\n").encode())

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
            os.chdir(self.project.directory)
            sys.path.insert(0, self.project.directory)
            # Spawned and forkserver children (multiprocessing, loky, a DataLoader)
            # import the functions of the project files by their module names.
            sys.path.append(self.project.config_dir)
            self.project.load_task_module()
            self.project.load_variable_module()
            self.converters = self.project.converters()
            self.spec = self.project.task_module
            self._call_hook("before_each_worker", self.worker_id)
            self.children.of_worker = set(_descendants(_child_pids()))
        except BaseException as exc:
            _print_traceback()
            error = str(exc) if isinstance(exc, ConfigError) else traceback.format_exc()
            self._send_quietly({"op": "fatal", "error": error})
            return 3
        self._send_quietly({"op": "ready", "pid": os.getpid(), "host": os.uname().nodename,
                            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")})
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
                result["terminated"] = True
            watchdog.disarm()
            if not self._send_quietly(result):
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
                    if line == SHUT_DOWN.encode():
                        return None
                    return _json_decode(line.decode("utf-8"))
            except _Terminated:
                self._read_lines(block=False)
                self._give_back(self._lines)
                self._lines.clear()
                self._send_quietly({"op": "terminated"})
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
        cancel = CANCEL.encode()
        lines = [line.strip() for line in self._lines]
        if cancel not in lines:
            return
        last = len(lines) - 1 - lines[::-1].index(cancel)
        self._give_back(lines[:last])
        self._lines = collections.deque(lines[last + 1:])

    def _give_back(self, lines):
        """Answer "cancelled" for the task lines among ``lines``."""
        for line in lines:
            if line.strip().startswith(b"{"):
                self._send_quietly({"op": "cancelled",
                                    "id": _json_decode(line.decode("utf-8"))["id"]})

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
        self._lines.extend(self._buffer.feed(data))
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
            stats = {"op": "stats"}
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
            if not self._send_quietly(stats):
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
        folder, log_file = message["folder"], message["log"]
        mode = self.project.output_mode
        try:
            _make_folder(folder)
            log_fd = _open_log(log_file)
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
        result = {"op": "result", "id": message["id"], "status": 0 if success else 1,
                  "reason": reason, "seconds": time.monotonic() - started}
        if self.load_seconds:
            result["load"] = self.load_seconds
        return result

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
                self.spec.task_method(variables, folder, log_file)
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
        changed = [(name, value, nickname) for name, value, nickname in variable_list
                   if not self._holds(name, value, nickname)]
        began = time.monotonic()
        released = [name for name, _, _ in changed
                    if self.retained.pop(name, None) is not None and name in self.converters]
        try:
            if released:
                gc.collect()   # free the old model before the converter loads the new one
                for name in released:
                    self.children.drop_value(name)
                self.children.end_strays()   # workers of pools the dropped objects held
            for name, value, nickname in changed:
                converter = self.converters.get(name)
                converted = value
                if converter is not None:
                    before = _child_pids()
                    converted = converter(str(value), nickname)
                    self.children.started_by(name, before)
                self.retained[name] = (value, nickname, converted)
        finally:
            if released or any(name in self.converters for name, _, _ in changed):
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


def _print_traceback():
    """The traceback of the exception being handled, into the task's log;
    a log that cannot be written (a full disk) must not end the worker."""
    try:
        traceback.print_exc()
    except (OSError, ValueError):
        pass


def _make_folder(folder):
    # One mkdir in the common case (parent exists); makedirs only when needed.
    try:
        os.mkdir(folder)
    except FileExistsError:
        if not os.path.isdir(folder):
            raise
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)


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
    worker = _WorkerProcess(project_dir, worker_id, report_stats="--report-stats" in argv[2:])
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
                     help="forget earlier results and run every task again")
    run.add_argument("--dry-run", action="store_true",
                     help="print the tasks, workers and GPUs, and run nothing")
    status = commands.add_parser("status", help="show a running sweep (from another terminal)")
    status.add_argument("directory", nargs="?", default=".", metavar="DIR")
    return parser


def _cmd_init(args):
    return init_project(args.directory)


def _cmd_run(args):
    return Threadward(args.directory, fresh=args.fresh, dry_run=args.dry_run).run()


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
    handler = {"init": _cmd_init, "run": _cmd_run, "status": _cmd_status}[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        _stderr("configuration error: %s" % exc)
        return EXIT_USAGE
    except ThreadwardError as exc:
        _stderr("error: %s" % exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _stderr("interrupted before any task ran")
        return 130
    except BrokenPipeError:
        # `threadward run --dry-run | head`: the reader left; so do we, quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

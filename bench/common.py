"""Shared helpers for the benchmarks: temporary projects, the real CLI, tables.

Every benchmark builds throwaway threadward projects under a temporary
folder and runs ``sys.executable -m threadward run DIR`` exactly as a user
would (B1 and B5 also run it with the timeline events off, see cli).
Timings are wall-clock (time.perf_counter) around the whole command.
Nothing here asserts on a timing: tables report ratios against baselines
measured in the same run, and a target column says whether it was met.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
FAKE_BIN = os.path.join(ROOT, "tests", "fake_bin")

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
KEEP = os.environ.get("BENCH_KEEP", "") not in ("", "0")


def set_quick(value):
    global QUICK
    QUICK = bool(value)


def pick(full, quick):
    """The full-size or the quick (BENCH_QUICK=1 / --quick) value."""
    return quick if QUICK else full


# -- temporary projects ------------------------------------------------------

class Scratch:
    """A temporary folder removed at the end (kept with BENCH_KEEP=1)."""

    def __init__(self, name, directory=None):
        self.path = tempfile.mkdtemp(prefix="threadward-bench-%s-" % name, dir=directory)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if KEEP:
            print("  (kept %s)" % self.path)
        else:
            shutil.rmtree(self.path, ignore_errors=True)

    def sub(self, *names):
        return os.path.join(self.path, *names)


def tmpfs_dir():
    """/dev/shm when it is a writable folder (a RAM file system), else None."""
    path = "/dev/shm"
    return path if os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK) else None


SLEEP_TASK = """
import time

SUCCESS_CONDITION = "NO_ERROR_ONLY"


def task_method(variables, task_folder, log_file):
    time.sleep(%r)
"""
RANGE_VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="i", values=list(range(%d)))
"""


def make_project(directory, task, variables, resources):
    """Write threadward/{task_specification,variable_iteration,resource_constraints}.py."""
    config = os.path.join(directory, "threadward")
    os.makedirs(os.path.join(config, "task_queue"), exist_ok=True)
    for name, text in (("task_specification.py", task),
                       ("variable_iteration.py", variables),
                       ("resource_constraints.py", resources)):
        with open(os.path.join(config, name), "w") as stream:
            stream.write(textwrap.dedent(text).lstrip())
    return directory


def queue_file(directory, name="successful_tasks.txt"):
    return os.path.join(directory, "threadward", "task_queue", name)


def count_lines(path):
    try:
        with open(path, "rb") as stream:
            return stream.read().count(b"\n")
    except FileNotFoundError:
        return 0


# threadward's main() with the timeline events off: events.jsonl gets only
# its "run", "task" and "end" lines (the ones `results` reads).  The module
# is imported, not run as __main__, so the flag is set before main() runs.
EVENTS_OFF = ("import sys, threadward; threadward.TIMELINE_EVENTS = False; "
              "sys.exit(threadward.main(sys.argv[1:]))")


def cli(directory, *args, events=True):
    """`threadward run DIR` as the console script runs it: the module imported
    (from this checkout, see clean_env), so its cached bytecode is used.
    ``events=False``: the same run with threadward.TIMELINE_EVENTS off, the
    baseline that B1 and B5 measure the events' cost against."""
    start = [sys.executable, "-m", "threadward"] if events else [sys.executable, "-c", EVENTS_OFF]
    return start + ["run", directory] + list(args)


def events_bytes(directory):
    """The size of the project's threadward/task_queue/events.jsonl (0 if none)."""
    try:
        return os.path.getsize(queue_file(directory, "events.jsonl"))
    except OSError:
        return 0


EVENTS_TARGET = 0.10   # issue 16: the timeline events cost <= 10 % of a sweep's time


def events_cost(rate_on, rate_off):
    """The timeline events' cost from the tasks/s with them on and off:
    (extra time as a share of the events-off time, on / off tasks/s, ms
    added per task), or Nones without both rates."""
    if not rate_on or not rate_off or rate_on != rate_on or rate_off != rate_off:
        return None, None, None
    return rate_off / rate_on - 1.0, rate_on / rate_off, 1000.0 / rate_on - 1000.0 / rate_off


def events_verdict(rate_on, rate_off):
    """'MET (events on / off: 0.95 x tasks/s, +0.011 ms per task, +5.3 %)'."""
    cost, ratio, added = events_cost(rate_on, rate_off)
    if cost is None:
        return "MISSED (not measured)"
    return "%s (events on / off: %.0f / %.0f tasks/s = %.3f x, %+.4f ms per task, %+.1f %%)" % (
        verdict(cost <= EVENTS_TARGET), rate_on, rate_off, ratio, added, 100.0 * cost)


def clean_env(extra=None):
    """The environment of a user's shell: this checkout first on the path, and
    bytecode caching on (some sandboxes set PYTHONDONTWRITEBYTECODE, which
    makes every process compile threadward.py again: ~45 ms of each start)."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_threadward(directory, expect=None, env=None, args=(), timeout=900, events=True):
    """Run the CLI to the end with stdin at /dev/null; return wall seconds.

    ``expect``: the number of successful tasks the run must record (a check
    that the benchmark measured what it claims, not a timing assert);
    ``events=False``: with the timeline events off (see cli).
    """
    log_path = os.path.join(directory, "bench-run.log")
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        result = subprocess.run(cli(directory, *args, events=events), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=clean_env(env),
                                timeout=timeout)
        wall = time.perf_counter() - started
    check_run(directory, result.returncode, expect, log_path)
    return wall


def check_run(directory, returncode, expect, log_path, allowed=(0,)):
    done = count_lines(queue_file(directory))
    if returncode not in allowed or (expect is not None and done != expect):
        with open(log_path, "rb") as stream:
            tail = stream.read()[-3000:].decode("utf-8", "replace")
        raise RuntimeError("threadward run in %s exited %s with %d successful tasks "
                           "(expected %s); its output ends:\n%s"
                           % (directory, returncode, done, expect, tail))


def best_of(repeats, function):
    """Smallest wall time of ``repeats`` calls (each returns seconds)."""
    return min(function() for _ in range(max(1, repeats)))


# -- /proc readings ------------------------------------------------------------

def proc_status_kib(pid, field):
    """A kB field of /proc/PID/status (VmHWM, VmRSS), or None."""
    try:
        with open("/proc/%d/status" % pid) as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_cpu_seconds(pid):
    """user + system CPU seconds of PID itself (not its children), or None."""
    try:
        with open("/proc/%d/stat" % pid) as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def wait_keep_zombie(process, timeout):
    """Wait for ``process`` to exit without reaping it, so /proc still shows its
    final CPU times; returns False on timeout.  Reap it with process.wait()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        time.sleep(0.02)
    return False


# -- output ----------------------------------------------------------------------

def fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return "{:,}".format(value)
    if abs(value) >= 1000:
        return "{:,.0f}".format(value)
    return "%.*f" % (digits, value)


def table(title, headers, rows, notes=()):
    """Print one aligned table: text columns left, numbers right."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(not isinstance(row[i], str) or row[i] == "-" for row in rows)
               for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(values, widths, numeric)).rstrip()

    print()
    print(title)
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    for note in notes:
        print("  " + note)
    sys.stdout.flush()


def verdict(ok):
    return "MET" if ok else "MISSED"

"""B1 dispatch: N no-op tasks on 2 workers, end to end.

threadward gives every task its folder, its log file and fd redirection;
the baselines do less (the "+ folder + log" pool row does the same file
work, to show what that costs by itself).  The marginal row removes
threadward's fixed start-up cost: (N - 1) / (T(N) - T(1)).

Creating a folder and a file is a file-system operation whose cost depends
on the disk: the "1 process, serial" row is that floor for the scratch disk
(TMPDIR), and the tmpfs row runs threadward with its project in /dev/shm,
which shows threadward's own dispatch cost without the disk.

The timeline events of events.jsonl (worker, hand, start, back, sample
lines) are measured by running the same projects with
threadward.TIMELINE_EVENTS off (common.cli(events=False)) in the same
rounds, on disk and on tmpfs: their cost is the events-on time over the
events-off time, less 1 (target of issue 16: <= 10 %).
"""

import concurrent.futures
import itertools
import os
import shutil
import subprocess
import sys
import time

import common

WORKERS = 2
TARGET_RATE = 5000.0

TASK = """
SUCCESS_CONDITION = "NO_ERROR_ONLY"

def task_method(variables, task_folder, log_file):
    pass
"""
VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="i", values=list(range(%d)))
"""
RESOURCES = "NUM_WORKERS = %d\n" % WORKERS


def noop(_):
    return None


def with_folder_and_log(arguments):
    """What threadward does per task besides calling it: folder, log, fd redirection."""
    root, index = arguments
    folder = os.path.join(root, str(index))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, "task.log"),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for descriptor in saved + (fd,):
        os.close(descriptor)


def serial_files_wall(root, count):
    started = time.perf_counter()
    for index in range(count):
        with_folder_and_log((root, index))
    return time.perf_counter() - started


NESTED_VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="a", values=list(range(%d)))
    variable_set.add_variable(name="b", values=list(range(100)))
"""


def threadward_wall(scratch, name, count, variables=None, events=True, sizes=None):
    # The projects stay until the scratch folder goes at the end: deleting
    # thousands of folders between runs slows the next run's file creation
    # on this kind of disk by up to 3 x, which is noise, not dispatch.
    def once():
        directory = scratch.sub("%s-%d" % (name, time.monotonic_ns()))
        common.make_project(directory, TASK, variables or VARIABLES % count, RESOURCES)
        wall = common.run_threadward(directory, expect=count, events=events)
        if sizes is not None:
            sizes[name] = common.events_bytes(directory)
        return wall
    return once


def pool_wall(count, function=noop, arguments=None):
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
        for _ in pool.map(function, arguments if arguments is not None else range(count)):
            pass
    return time.perf_counter() - started


def per_process_wall(command_prefix, count):
    started = time.perf_counter()
    subprocess.run(command_prefix, input="".join("%d\n" % i for i in range(count)),
                   universal_newlines=True, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    count = common.pick(5000, 1000)
    few = common.pick(100, 50)          # a process per task is slow: fewer, then scaled
    repeats = common.pick(3, 1)
    rows, notes = [], []

    def row(method, ran, wall, note="", workers=WORKERS):
        rate = ran / wall
        rows.append([method, ran, wall, int(round(rate)), 1000.0 * wall * workers / ran,
                     count / rate, note])
        return rate

    shm = common.tmpfs_dir()
    with common.Scratch("b1") as scratch, common.Scratch("b1", shm) as ram:
        # Each repeat times every method once, in turn, so that all of them
        # see the disk in the same moods; the best of each is kept.
        fresh = itertools.count()

        def pool_with_files():
            root = scratch.sub("pool-files-%d" % next(fresh))
            return pool_wall(count, with_folder_and_log, [(root, i) for i in range(count)])

        sizes = {}   # events.jsonl bytes of the last run of each project name
        methods = [
            ("full", threadward_wall(scratch, "tw", count, sizes=sizes)),
            ("full off", threadward_wall(scratch, "tw-off", count, events=False, sizes=sizes)),
            ("one", threadward_wall(scratch, "one", 1)),
            ("one off", threadward_wall(scratch, "one-off", 1, events=False)),
            ("nested", threadward_wall(scratch, "nested", count,
                                       NESTED_VARIABLES % max(1, count // 100))),
            ("tmpfs", threadward_wall(ram, "tw", count) if shm else lambda: float("nan")),
            ("tmpfs off", threadward_wall(ram, "tw-off", count, events=False)
             if shm else lambda: float("nan")),
            ("pool", lambda: pool_wall(count)),
            ("pool files", pool_with_files),
            ("files", lambda: serial_files_wall(scratch.sub("serial-%d" % next(fresh)), count)),
            ("tmpfs files", lambda: serial_files_wall(ram.sub("serial-%d" % next(fresh)), count)
             if shm else float("nan")),
        ]
        best = {}
        for _ in range(repeats):
            for name, measure in methods:
                best[name] = min(best.get(name, float("inf")), measure())

        full, one = best["full"], best["one"]
        tw_rate = row("threadward", count, full, "end to end, best of %d" % repeats)
        marginal = (count - 1) / max(full - one, 1e-9)
        rows.append(["threadward, marginal", count - 1, full - one, int(round(marginal)),
                     1000.0 * WORKERS / marginal, (count - 1) / marginal,
                     "minus a 1-task run (%.2f s start-up)" % one])
        off_rate = row("threadward, events off", count, best["full off"],
                       "TIMELINE_EVENTS = False: run, task, end lines only")
        off_marginal = (count - 1) / max(best["full off"] - best["one off"], 1e-9)
        rows.append(["threadward, events off, marginal", count - 1,
                     best["full off"] - best["one off"], int(round(off_marginal)),
                     1000.0 * WORKERS / off_marginal, (count - 1) / off_marginal,
                     "minus a 1-task run (%.2f s start-up)" % best["one off"]])
        row("threadward, %d x 100 sweep" % max(1, count // 100), count, best["nested"],
            "folders of 100 entries, not one of %d" % count)
        if shm:
            row("threadward, project on tmpfs", count, best["tmpfs"], "/dev/shm: no disk cost")
            row("threadward, tmpfs, events off", count, best["tmpfs off"],
                "TIMELINE_EVENTS = False")
        else:
            notes.append("tmpfs: no writable /dev/shm; the tmpfs row is skipped")
        row("ProcessPoolExecutor(2)", count, best["pool"], "no folder, no log")
        row("ProcessPoolExecutor(2) + folder + log", count, best["pool files"],
            "same file work as threadward")
        row("folder + log only, 1 process", count, best["files"],
            "file-system floor, no dispatch", workers=1)

        try:
            import joblib
        except ImportError:
            joblib = None
            notes.append("joblib: not importable in %s; skipped" % sys.executable)
        if joblib is not None:
            def joblib_wall():
                started = time.perf_counter()
                joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(noop)(i) for i in range(count))
                return time.perf_counter() - started
            row("joblib Parallel(n_jobs=2)", count, common.best_of(repeats, joblib_wall),
                "loky backend")

        row("xargs -P 2 (a process per task)", few, per_process_wall(
            ["xargs", "-P", str(WORKERS), "-n", "1", sys.executable, "-c", "pass"], few),
            "python -c pass; time for N scaled")
        if shutil.which("parallel"):
            row("GNU parallel -j 2", few, per_process_wall(
                ["parallel", "-j", str(WORKERS), sys.executable, "-c", "pass"], few),
                "time for N scaled")
        else:
            notes.append("GNU parallel: not installed; skipped")

    floor_ms = 1000.0 * best["files"] / count
    tmpfs_floor_ms = 1000.0 * best["tmpfs files"] / count
    tw_time = count / tw_rate
    for r in rows:
        r.insert(6, r[5] / tw_time)
    tmpfs_rate = count / best["tmpfs"] if shm else float("nan")
    tmpfs_off_rate = count / best["tmpfs off"] if shm else float("nan")
    pool_files_rate = count / best["pool files"]
    notes[:0] = [
        "target: >= %d tasks/s end to end (<= %.1f ms per task per worker): on disk %s "
        "(%.0f/s end to end, %.0f/s marginal); on tmpfs %s (%.0f/s end to end)"
        % (TARGET_RATE, 1000.0 * WORKERS / TARGET_RATE, common.verdict(tw_rate >= TARGET_RATE),
           tw_rate, marginal, common.verdict(tmpfs_rate >= TARGET_RATE), tmpfs_rate),
        "on disk the file work bounds everyone: the same folders and logs made by a process "
        "pool ran at %.0f/s in this run (threadward %.2f x that)"
        % (pool_files_rate, tw_rate / pool_files_rate),
        "per task per worker above the floor (the same folders and logs in a plain loop, "
        "this run): %.3f ms marginal on disk (%.3f ms, less the floor's %.3f ms)%s"
        % (1000.0 * WORKERS / marginal - floor_ms, 1000.0 * WORKERS / marginal, floor_ms,
           "; on tmpfs %.3f ms end to end, less a floor of %.3f ms" % (
               1000.0 * WORKERS / tmpfs_rate - tmpfs_floor_ms, tmpfs_floor_ms)
           if shm else "")]
    notes[3:3] = [
        "target: events cost <= %d %% (issue 16): on disk %s; marginal %s; on tmpfs %s"
        % (100 * common.EVENTS_TARGET, common.events_verdict(tw_rate, off_rate),
           common.events_verdict(marginal, off_marginal),
           common.events_verdict(tmpfs_rate, tmpfs_off_rate) if shm else "skipped"),
        "events cost = events-on time / events-off time - 1 (best of %d each, timed in the "
        "same rounds); events.jsonl: %.0f B per task with the timeline events, %.0f B "
        "without (the %d-task run on disk)"
        % (repeats, sizes["tw"] / count, sizes["tw-off"] / count, count)]
    common.table("B1 dispatch: %d no-op tasks on %d workers" % (count, WORKERS),
                 ["method", "tasks run", "wall s", "tasks/s", "ms/task/worker",
                  "s for N", "x threadward", "note"], rows, notes)
    return {"rate": tw_rate, "marginal": marginal, "tmpfs": tmpfs_rate,
            "events_cost": common.events_cost(tw_rate, off_rate)[0],
            "tmpfs_events_cost": common.events_cost(tmpfs_rate, tmpfs_off_rate)[0]}

"""B2 sleep tasks vs the ideal: N tasks of 50 ms on 2 workers.

The ideal is N * 0.05 / 2; everything above it is threadward's overhead
(start-up, dispatch, folders, logs, teardown), shown per task as well.

Each task also notes when task_method began and ended (time.monotonic is one
clock for all processes), so the gap a worker spends between the end of one
task and the start of the next (its result, the main process's answer, the
next folder, log and fd redirection) is measured directly: for 50 ms tasks,
which are queued ahead, and for 150 ms tasks, which are sent one at a time
when the result arrives.
"""

import concurrent.futures
import glob
import os
import time

import common

WORKERS = 2
SECONDS = 0.05

RESOURCES = "NUM_WORKERS = %d\n" % WORKERS


LONGER = 0.15

TIMED_TASK = """
import os, time

def task_method(variables, task_folder, log_file):
    started = time.monotonic()
    time.sleep(%r)
    ended = time.monotonic()
    with open(os.path.join(task_folder, "times"), "w") as stream:
        stream.write("%%r %%r %%d" %% (started, ended, os.getpid()))
"""


def sleep_task(_):
    time.sleep(SECONDS)


def gaps_ms(directory):
    """Per worker, the milliseconds from one task's end to the next one's start."""
    by_worker = {}
    for path in glob.glob(os.path.join(directory, "threadward", "task_outputs", "*", "times")):
        with open(path) as stream:
            started, ended, pid = stream.read().split()
        by_worker.setdefault(pid, []).append((float(started), float(ended)))
    gaps = []
    for spans in by_worker.values():
        spans.sort()
        gaps.extend(1000.0 * (nxt[0] - cur[1]) for cur, nxt in zip(spans, spans[1:]))
    return sorted(gaps)


def percentile(values, fraction):
    return values[min(len(values) - 1, int(fraction * len(values)))]


def main():
    count = common.pick(200, 60)
    ideal = count * SECONDS / WORKERS
    rows = []

    def row(method, wall, note):
        rows.append([method, count, wall, ideal, wall / ideal,
                     1000.0 * (wall - ideal) * WORKERS / count, note])

    gap_rows = []
    shm = common.tmpfs_dir()
    with common.Scratch("b2") as scratch, common.Scratch("b2", shm) as ram:
        directory = common.make_project(scratch.sub("sleep"), TIMED_TASK % SECONDS,
                                        common.RANGE_VARIABLES % count, RESOURCES)
        tw = common.run_threadward(directory, expect=count)
        row("threadward", tw, "folder + log per task")
        # The gaps again with the projects on tmpfs (when there is one): the
        # disk's share of creating folders and logs swings too much to see
        # threadward's own in it.
        for seconds, tasks, how in ((SECONDS, common.pick(100, 40), "queued ahead"),
                                    (LONGER, common.pick(40, 20), "sent when the result arrives")):
            for storage, root in (("disk", scratch), ("tmpfs", ram if shm else None)):
                if root is None:
                    continue
                where = common.make_project(root.sub("gaps-%s-%d" % (storage, seconds * 1000)),
                                            TIMED_TASK % seconds,
                                            common.RANGE_VARIABLES % tasks, RESOURCES)
                common.run_threadward(where, expect=tasks)
                gaps = gaps_ms(where)
                gap_rows.append(["%d ms" % (seconds * 1000), how, storage, len(gaps),
                                 percentile(gaps, 0.5), percentile(gaps, 0.99), gaps[-1]])
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
        list(pool.map(sleep_task, range(count)))
    row("ProcessPoolExecutor(2)", time.perf_counter() - started, "no folder, no log")
    common.table("B2 sleep tasks: %d x %d ms on %d workers" % (count, SECONDS * 1000, WORKERS),
                 ["method", "tasks", "wall s", "ideal s", "x ideal", "overhead ms/task",
                  "note"], rows,
                 ["ideal = tasks x %.2f s / %d workers; overhead = (wall - ideal) x workers / "
                  "tasks" % (SECONDS, WORKERS)])
    judged = [r for r in gap_rows if r[2] == ("tmpfs" if shm else "disk")]
    worst_median = max(r[4] for r in judged)
    common.table("B2 a worker's gap between tasks (end of one task_method to the start of "
                 "the next)", ["tasks", "next task", "storage", "gaps", "median ms", "p99 ms",
                               "max ms"], gap_rows,
                 ["the gap holds the result, the main process's answer and the next task's "
                  "folder, log and fd redirection (and the `times` file each task writes)",
                  "target: a freed worker gets its next task within a millisecond of its "
                  "result: %s (median gap on %s %.2f ms at most)"
                  % (common.verdict(worst_median < 1.0), judged[0][2], worst_median)])
    return {"ratio": tw / ideal}

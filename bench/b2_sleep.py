"""B2 sleep tasks vs the ideal: N tasks of 50 ms on 2 workers.

The ideal is N * 0.05 / 2; everything above it is threadward's overhead
(start-up, dispatch, folders, logs, teardown), shown per task as well.
"""

import concurrent.futures
import time

import common

WORKERS = 2
SECONDS = 0.05

RESOURCES = "NUM_WORKERS = %d\n" % WORKERS


def sleep_task(_):
    time.sleep(SECONDS)


def main():
    count = common.pick(200, 60)
    ideal = count * SECONDS / WORKERS
    rows = []

    def row(method, wall, note):
        rows.append([method, count, wall, ideal, wall / ideal,
                     1000.0 * (wall - ideal) * WORKERS / count, note])

    with common.Scratch("b2") as scratch:
        directory = common.make_project(scratch.sub("sleep"), common.SLEEP_TASK % SECONDS,
                                        common.RANGE_VARIABLES % count, RESOURCES)
        tw = common.run_threadward(directory, expect=count)
        row("threadward", tw, "folder + log per task")
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
        list(pool.map(sleep_task, range(count)))
    row("ProcessPoolExecutor(2)", time.perf_counter() - started, "no folder, no log")
    common.table("B2 sleep tasks: %d x %d ms on %d workers" % (count, SECONDS * 1000, WORKERS),
                 ["method", "tasks", "wall s", "ideal s", "x ideal", "overhead ms/task",
                  "note"], rows,
                 ["ideal = tasks x %.2f s / %d workers; overhead = (wall - ideal) x workers / "
                  "tasks" % (SECONDS, WORKERS)])
    return {"ratio": tw / ideal}

"""B3 expensive loads: converters that sleep like a model load, counted.

Each NAME_to_value converter sleeps (the load) and appends a line to a file,
so the loads are counted, not inferred.  The baseline runs the same task list,
in generation order, on a ProcessPoolExecutor whose processes cache loads with
functools.lru_cache(maxsize=None) (which, unlike threadward, keeps every model
it ever loaded in memory).

ideal = (tasks x task seconds + sum over levels of loads x load seconds) / W
for the perfectly balanced schedule that walks the sweep in order and cuts it
into W equal contiguous pieces: with P distinct prefixes down to a level, it
loads that level P + W - gcd(P, W) times (each of the W - 1 cuts costs one
load unless it falls on a prefix boundary).  The target for the top level
is M + W - 1 loads.
"""

import collections
import concurrent.futures
import functools
import itertools
import math
import os
import time

import common

TASK = """
import time

SUCCESS_CONDITION = "NO_ERROR_ONLY"

def task_method(variables, task_folder, log_file):
    time.sleep(%(task_seconds)r)
"""
CONVERTER = """
def %(name)s_to_value(string_value, nickname):
    time.sleep(%(seconds)r)
    with open(%(loads)r, "a") as stream:
        stream.write("%(name)s %%s %%d\\n" %% (string_value, os.getpid()))
    return string_value
"""


@functools.lru_cache(maxsize=None)
def cached_load(name, value, seconds, loads):
    time.sleep(seconds)
    with open(loads, "a") as stream:
        stream.write("%s %s %d\n" % (name, value, os.getpid()))
    return value


def pool_task(arguments):
    task, levels, task_seconds, loads = arguments
    for (name, _, seconds), value in zip(levels, task):
        if seconds:
            cached_load(name, value, seconds, loads)
    time.sleep(task_seconds)


def count_loads(path):
    counts = collections.Counter()
    try:
        with open(path) as stream:
            for line in stream:
                counts[line.split()[0]] += 1
    except FileNotFoundError:
        pass
    return counts


def ideal_loads(levels, workers):
    """{level name: loads of the balanced contiguous schedule} for levels with a load."""
    result, prefixes = {}, 1
    for name, values, seconds in levels:
        prefixes *= len(values)
        if seconds:
            result[name] = prefixes + workers - math.gcd(prefixes, workers)
    return result


def run_case(scratch, label, levels, task_seconds, workers):
    tasks = list(itertools.product(*[values for _, values, _ in levels]))
    limit = ideal_loads(levels, workers)
    ideal = (len(tasks) * task_seconds +
             sum(limit[name] * seconds for name, _, seconds in levels if seconds)) / workers
    loaded = [name for name, _, seconds in levels if seconds]

    def describe(counts):
        return " ".join("%s %d/%d" % (name, counts[name], limit[name]) for name in loaded)

    directory = scratch.sub(label)
    loads = os.path.join(directory, "loads.txt")
    variables = "import os\nimport time\n\n\ndef setup_variable_set(variable_set):\n"
    for name, values, _ in levels:
        variables += "    variable_set.add_variable(name=%r, values=%r)\n" % (name, list(values))
    for name, _, seconds in levels:
        if seconds:
            variables += CONVERTER % {"name": name, "seconds": seconds, "loads": loads}
    common.make_project(directory, TASK % {"task_seconds": task_seconds}, variables,
                        "NUM_WORKERS = %d\n" % workers)
    tw_wall = common.run_threadward(directory, expect=len(tasks))
    tw_loads = count_loads(loads)
    top = loaded[0]
    top_bound = len(levels[0][1]) + workers - 1
    top_ok = tw_loads[top] <= top_bound

    pool_loads = scratch.sub(label + "-pool-loads.txt")
    arguments = [(task, levels, task_seconds, pool_loads) for task in tasks]
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(pool_task, arguments))
    pool_wall = time.perf_counter() - started
    pool_counts = count_loads(pool_loads)

    shape = " x ".join(str(len(values)) for _, values, _ in levels)
    return [
        [label, shape, workers, "threadward", describe(tw_loads),
         "%d <= %d %s" % (tw_loads[top], top_bound, common.verdict(top_ok)),
         tw_wall, ideal, tw_wall / ideal, 1.0],
        [label, shape, workers, "pool + lru_cache", describe(pool_counts), "",
         pool_wall, ideal, pool_wall / ideal, pool_wall / tw_wall],
    ], tw_wall / ideal, top_ok


def main():
    load = common.pick(1.0, 0.5)
    per_model = common.pick(40, 20)
    rows, notes = [], []
    with common.Scratch("b3") as scratch:
        case_a, ratio_a, top_a = run_case(
            scratch, "A", [("model", ["m%d" % i for i in range(3)], load),
                           ("i", list(range(per_model)), 0)], 0.02, 2)
        rows += case_a
        seeds = common.pick(10, 4)
        models = common.pick(8, 5)
        case_b, ratio_b, top_b = run_case(
            scratch, "B", [("model", ["m%d" % i for i in range(models)], load),
                           ("dataset", ["d0", "d1", "d2"], load / 5),
                           ("seed", list(range(seeds)), 0)], 0.02, 4)
        rows += case_b
    notes.append("loads: counted / the ideal schedule's (P + W - gcd(P, W), P = prefixes); "
                 "model load %.1f s, dataset load %.2f s, task 20 ms" % (load, load / 5))
    notes.append("target: top-level loads <= M + W - 1: A %s, B %s; wall <= 1.15 x ideal on "
                 "A: %s (%.2f x)" % (common.verdict(top_a), common.verdict(top_b),
                                     common.verdict(ratio_a <= 1.15), ratio_a))
    common.table("B3 expensive loads", ["case", "sweep", "W", "method", "loads / ideal's",
                                        "top <= M+W-1", "wall s", "ideal s", "x ideal",
                                        "x threadward"], rows, notes)
    return {"ratio_a": ratio_a, "ratio_b": ratio_b}

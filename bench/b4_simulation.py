"""B4 scheduling simulation: threadward._Scheduler on an event-driven clock.

No processes: workers are heap entries, asked as the main loop asks them
(results ending together are read in one pass; patience only while some
worker holds a task).  A worker that gets a task pays a
load at every level whose prefix (the values down to that level) differs
from its previous task's, then the task's own duration.  (The real worker
keeps a value that is equal across prefixes, so it can only load less.)
The scheduler learns each task's seconds and load seconds as the main
process tells it; a worker it tells to wait asks again after every event.

Per level: loads vs the lower bound LB = max(distinct prefixes down to the
level, workers used): every prefix is loaded at least once and every worker
loads every level once.  At the top level also vs the target M + W - 1 (for
equal durations).  Makespan vs the load-aware ideal
max((task work + LB load work) / W, longest task + its loads): no schedule
beats it.  Three variants per shape and W: equal durations, random ones
(exponential, mean 1), and random on a ragged sweep (a third of the lowest
values dropped under each parent, as `exceptions` do).

Then a grid of shapes (M models x 100 tasks, and M x 6 datasets x 10 seeds,
for every M and W in a range) checks the bound P + W - 1 at every level for
equal durations, and compares the makespan with the same scheduler without
its join limit (``_may_join`` always yes), for equal durations, durations
within 30 % of the mean, and lognormal ones (sigma 1), in the same run.
"""

import heapq
import random
import sys
import time

import common

sys.path.insert(0, common.ROOT)

import threadward  # noqa: E402

# Load cost per level as a multiple of the mean task duration: a model load
# costs ten tasks, a dataset two, anything lower nothing.
LOAD_COSTS = (10.0, 2.0)


def make_tasks(shape, rng, ragged):
    """Every index tuple of ``shape``; ragged drops a random third of the
    lowest-level values below each parent (like `exceptions`)."""
    tasks = [()]
    for depth, size in enumerate(shape):
        grown = []
        for prefix in tasks:
            values = list(range(size))
            if ragged and depth == len(shape) - 1 and size > 2:
                values = sorted(rng.sample(values, max(1, size - size // 3)))
            grown.extend(prefix + (v,) for v in values)
        tasks = grown
    return tasks


def simulate(shape, workers, durations, rng, ragged=False, patient=True, limit=True):
    tasks = make_tasks(shape, rng, ragged)
    depth = len(shape)
    costs = [LOAD_COSTS[k] if k < len(LOAD_COSTS) and k < depth - 1 else 0.0
             for k in range(depth)]
    if durations == "equal":
        length = dict.fromkeys(tasks, 1.0)
    elif durations == "lognormal":   # heavy-tailed, sigma 1
        length = {task: rng.lognormvariate(0.0, 1.0) for task in tasks}
    elif durations == "jitter":   # within 30 % of the mean (CV 0.17)
        length = {task: rng.uniform(0.7, 1.3) for task in tasks}
    else:   # heavy-tailed: exponential with mean 1
        length = {task: rng.expovariate(1.0) for task in tasks}
    clock = [0.0]
    # The baselines: without the join limit (join whenever the load pays);
    # not patient (never wait: join at once).
    policy = threadward._JoinPolicy(limit=limit and patient, weigh=patient)
    scheduler = threadward._Scheduler(depth, clock=lambda: clock[0], policy=policy)
    for task in tasks:
        scheduler.add(task)
    held = [None] * workers
    took = [None] * workers   # (seconds, load seconds) of its task in flight
    idle = list(range(workers))
    loads = [0] * depth
    used = set()
    heap = []
    spent = 0.0
    assignments = 0

    def start(worker, task, now):
        used.add(worker)
        idle.remove(worker)
        load = 0.0
        previous = held[worker]
        for level in range(depth):
            if previous is None or previous[:level + 1] != task[:level + 1]:
                loads[level] += 1
                load += costs[level]
        held[worker] = task
        took[worker] = (length[task] + load, load)
        heapq.heappush(heap, (now + length[task] + load, worker))

    makespan = 0.0
    while True:
        # The asking of one pass of the main loop, through the scheduler's
        # hand_out as the loop does: the freed workers and those told to wait.
        began = time.perf_counter()
        asks = list(scheduler.hand_out(list(idle), holding=bool(heap)))
        spent += time.perf_counter() - began
        assignments += len(asks)
        for worker, task in asks:
            if task is not None:
                start(worker, task, clock[0])
        if not heap:
            if not len(scheduler):
                break
            clock[0] += threadward.WAIT_RECHECK   # the loop's next pass
            continue
        # Results that end together are read in one pass of the main loop.
        now = heap[0][0]
        makespan = clock[0] = now
        while heap and heap[0][0] == now:
            _, worker = heapq.heappop(heap)
            began = time.perf_counter()
            scheduler.release(worker, seconds=took[worker][0], load=took[worker][1])
            spent += time.perf_counter() - began
            idle.append(worker)
    assert not len(scheduler), "every worker waits with tasks left"

    distinct = [len({task[:level + 1] for task in tasks}) for level in range(depth)]
    lower = [max(d, len(used)) for d in distinct]
    work = sum(length.values()) + sum(c * b for c, b in zip(costs, lower))
    longest = max(length[t] + sum(costs) for t in tasks)
    ideal = max(work / workers, longest)
    # P + W - 1 at every level above the last (the last level is every task)
    within = all(loads[k] <= distinct[k] + workers - 1 for k in range(max(1, depth - 1)))
    return {"tasks": len(tasks), "loads": loads, "lower": lower,
            "top_bound": shape[0] + workers - 1, "within": within,
            "makespan": makespan, "ideal": ideal,
            "us_per_task": 1e6 * spent / max(1, assignments)}


def contiguous_split(shape, workers):
    """The schedule the M + W - 1 bound comes from (McNaughton's): equal
    tasks in order, cut into W runs of N / W, each run to one worker, all
    planned at the start.  Top-level loads and makespan, same load costs."""
    tasks = make_tasks(shape, None, False)
    depth = len(shape)
    costs = [LOAD_COSTS[k] if k < len(LOAD_COSTS) and k < depth - 1 else 0.0
             for k in range(depth)]
    top_loads, makespan = 0, 0.0
    for worker in range(workers):
        run = tasks[len(tasks) * worker // workers:len(tasks) * (worker + 1) // workers]
        spent, previous = float(len(run)), None
        for task in run:
            for level in range(depth):
                if previous is None or previous[:level + 1] != task[:level + 1]:
                    spent += costs[level]
                    top_loads += level == 0
            previous = task
        makespan = max(makespan, spent)
    return top_loads, makespan


def spans(numbers):
    """[1, 2, 3, 5] -> '1..3, 5'."""
    parts, start = [], None
    for index, number in enumerate(numbers):
        if start is None:
            start = number
        if index + 1 == len(numbers) or numbers[index + 1] != number + 1:
            parts.append(str(start) if start == number else "%d..%d" % (start, number))
            start = None
    return ", ".join(parts)


def grid(models, worker_counts, rng):
    """Every M in ``models`` x W in ``worker_counts`` x (M, 100) and (M, 6, 10):
    equal durations (within P + W - 1 at every level? makespan against the
    scheduler without its join limit), jittered and lognormal ones (makespan,
    same)."""
    runs = over = 0
    ratios = {name: [] for name in GRID_DURATIONS}
    worst = dict.fromkeys(GRID_DURATIONS, (0.0, None))
    for models_ in models:
        for workers in worker_counts:
            for shape in ((models_, 100), (models_, 6, 10)):
                for durations in GRID_DURATIONS:
                    state = rng.getstate()
                    limited = simulate(shape, workers, durations, rng)
                    rng.setstate(state)
                    free = simulate(shape, workers, durations, rng, limit=False)
                    ratio = limited["makespan"] / free["makespan"]
                    ratios[durations].append(ratio)
                    if ratio > worst[durations][0]:
                        worst[durations] = (ratio, "%s W=%d" % (
                            "x".join(map(str, shape)), workers))
                    if durations == "equal":
                        runs += 1
                        over += not limited["within"]
    return runs, over, ratios, worst


SHAPES_FULL = [(3, 40), (8, 3, 10), (10, 100), (1, 1000), (100, 10), (1000,), (4, 4, 4, 4),
               (2, 2, 2, 2, 2, 2, 2), (20, 5, 20), (10, 100, 30)]
SHAPES_QUICK = [(3, 40), (8, 3, 10), (10, 100), (1, 200), (100, 10), (4, 4, 4, 4)]
WORKERS_FULL = (2, 4, 8, 16)
WORKERS_QUICK = (2, 4, 8)
GRID_DURATIONS = ("equal", "jitter", "lognormal")
GRID_MODELS_FULL, GRID_MODELS_QUICK = list(range(1, 17)) + [20], list(range(1, 9))
GRID_WORKERS_FULL, GRID_WORKERS_QUICK = range(2, 25), range(2, 13)
VARIANTS = (("equal", False), ("random", False), ("random", True))


def main():
    rng = random.Random(20240521)
    shapes = common.pick(SHAPES_FULL, SHAPES_QUICK)
    worker_counts = common.pick(WORKERS_FULL, WORKERS_QUICK)
    rows = []
    over_bound, over_random, levels_over = [], 0, 0
    worst = {variant: (0.0, None) for variant in VARIANTS}
    total_us, total_n = 0.0, 0
    joining = {variant: [] for variant in VARIANTS}   # (top loads, always joining, makespan ratio)
    for shape in shapes:
        name = "x".join(map(str, shape))
        for workers in worker_counts:
            row = [name, workers, None]
            us = []
            for variant in VARIANTS:
                state = rng.getstate()
                result = simulate(shape, workers, variant[0], rng, variant[1])
                rng.setstate(state)   # the same durations, with workers that never wait
                always = simulate(shape, workers, variant[0], rng, variant[1], patient=False)
                joining[variant].append((result["loads"][0], always["loads"][0],
                                         result["makespan"] / always["makespan"]))
                loads, lower = result["loads"], result["lower"]
                levels = len(shape) - 1 or 1
                row.append(" ".join("%d/%d" % (loads[k], lower[k]) for k in range(levels)))
                top_ok = loads[0] <= result["top_bound"]
                if variant == VARIANTS[0]:
                    row[2] = result["tasks"]
                    row.append("%d/%d %s" % (loads[0], result["top_bound"],
                                             "ok" if top_ok else "OVER"))
                    levels_over += not result["within"]
                    if not top_ok:
                        split_loads, split_makespan = contiguous_split(shape, workers)
                        over_bound.append(
                            "%s W=%d: %d loads, makespan %.1f; the planned contiguous split "
                            "%d loads, makespan %.1f" % (
                                name, workers, loads[0], result["makespan"], split_loads,
                                split_makespan))
                elif not top_ok:
                    over_random += 1
                ratio = result["makespan"] / result["ideal"]
                row.append(ratio)
                if ratio > worst[variant][0]:
                    worst[variant] = (ratio, "%s W=%d" % (name, workers))
                us.append(result["us_per_task"])
                total_us += result["us_per_task"] * result["tasks"]
                total_n += result["tasks"]
            row.append(sum(us) / len(us))
            rows.append(row)
    runs = len(rows) * len(VARIANTS)
    began = time.perf_counter()
    grid_models = common.pick(GRID_MODELS_FULL, GRID_MODELS_QUICK)
    grid_workers = common.pick(GRID_WORKERS_FULL, GRID_WORKERS_QUICK)
    grid_runs, grid_over, grid_ratios, grid_worst = grid(grid_models, grid_workers, rng)
    grid_seconds = time.perf_counter() - began
    notes = [
        "loads: count/LB per level (upper levels; load costs %s x the mean task); "
        "top: count/(M+W-1)" % " / ".join("%g" % c for c in LOAD_COSTS),
        "target: top-level loads <= M + W - 1 for equal durations: %s%s"
        % (common.verdict(not over_bound), " (over in %d of %d)" % (len(over_bound), len(rows))
           if over_bound else " (%d of %d runs)" % (len(rows), len(rows))),
    ] + ["  %s" % over for over in over_bound] + [
        "  at every level (P + W - 1, P = prefixes at the level): over in %d of %d runs"
        % (levels_over, len(rows)),
        "grid, M = %s x W = %d..%d x (M x 100, M x 6 x 10), equal durations: loads over "
        "P + W - 1 at some level in %d of %d runs: %s (%.0f s)"
        % (spans(grid_models), grid_workers[0], grid_workers[-1], grid_over,
           grid_runs, common.verdict(not grid_over), grid_seconds),
    ] + [
        "  makespan vs the same scheduler without its join limit, %-10s x%.4f on average, "
        "best x%.3f, worst x%.3f%s"
        % (name + ":", sum(values) / len(values), min(values), max(values),
           " (%s)" % grid_worst[name][1] if max(values) > 1.0 else " (never slower)")
        for name, values in grid_ratios.items()
    ] + [
        "random durations (no target): top level over M + W - 1 in %d of %d runs"
        % (over_random, 2 * len(rows)),
        "worst makespan/ideal: equal %.2f (%s), random %.2f (%s), ragged %.2f (%s)"
        % tuple(x for v in VARIANTS for x in worst[v]),
        "waiting (for a load that pays, within the join limit) vs joining at once "
        "(the same runs, same durations):",
    ] + [
        "  %-6s %d vs %d top-level loads; makespan x%.2f on average, best x%.2f, worst x%.2f"
        % (name, sum(r[0] for r in runs_), sum(r[1] for r in runs_),
           sum(r[2] for r in runs_) / len(runs_), min(r[2] for r in runs_),
           max(r[2] for r in runs_))
        for name, runs_ in zip(("equal", "random", "ragged"), joining.values())
    ] + [
        "scheduler cost: %.1f us per assign+release on average" % (total_us / max(1, total_n)),
    ]
    common.table("B4 scheduler simulation (%d runs)" % runs,
                 ["sweep", "W", "tasks", "equal: loads/LB", "top/(M+W-1)", "mk/ideal",
                  "random: loads/LB", "mk/ideal", "ragged: loads/LB", "mk/ideal",
                  "us/assign"], rows, notes)
    return {"over_bound": over_bound, "worst": worst, "grid_over": grid_over}

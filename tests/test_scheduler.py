"""Unit tests of threadward._Scheduler, the prefix tree that hands out tasks.

No processes and no sleeps: workers are simulated by keys and, where timing
matters, by a small event-driven simulator (a heap of finish times).
"""

import heapq
import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import threadward
from threadward import _JoinPolicy, _Scheduler


def grid(*shape):
    """Every task of a full cartesian shape, in hierarchy order."""
    return list(itertools.product(*[range(n) for n in shape]))


def scheduler_for(tasks, depth=None):
    scheduler = _Scheduler(depth if depth is not None else len(tasks[0]))
    for task in tasks:
        scheduler.add(task)
    return scheduler


def common_prefix(a, b):
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def simulate(tasks, workers, duration=lambda task: 1.0):
    """Run the scheduler with `workers` workers that all start at time 0.

    Returns {worker: [task, ...]} in the order each worker received them.
    Ties are broken by worker number, so the result is deterministic.
    """
    scheduler = scheduler_for(tasks)
    history = dict((w, []) for w in range(workers))
    events = []
    for worker in range(workers):
        task = scheduler.assign(worker)
        if task is None:
            break
        history[worker].append(task)
        heapq.heappush(events, (duration(task), worker))
    while events:
        now, worker = heapq.heappop(events)
        task = scheduler.assign(worker)
        if task is None:
            continue
        history[worker].append(task)
        heapq.heappush(events, (now + duration(task), worker))
    assert len(scheduler) == 0
    assert scheduler.assign(0) is None
    return history


def loads(history):
    """How often each worker's top-level value changes, counting its first."""
    total = 0
    for tasks in history.values():
        previous = object()
        for task in tasks:
            if task[0] != previous:
                total += 1
                previous = task[0]
    return total


def assert_each_task_once(history, tasks):
    handed = [task for tasks_of in history.values() for task in tasks_of]
    assert len(handed) == len(set(handed))
    assert sorted(handed) == sorted(tasks)


# -- basics --------------------------------------------------------------------

def test_len_counts_remaining_tasks():
    tasks = grid(2, 3, 2)
    scheduler = scheduler_for(tasks)
    assert len(scheduler) == 12
    handed = []
    for step in range(12):
        # impatient: a task whenever one is left (the join limit is not under test)
        handed.append(scheduler.assign(step % 3, patient=False))
        assert len(scheduler) == 11 - step
    assert scheduler.assign(0) is None
    assert scheduler.assign(99) is None
    assert sorted(handed) == tasks
    assert len(scheduler) == 0


def test_single_variable():
    tasks = grid(5)
    scheduler = scheduler_for(tasks)
    handed = [scheduler.assign("w") for _ in range(5)]
    assert handed == tasks   # a lone worker goes in order
    assert scheduler.assign("w") is None


def test_a_lone_worker_goes_in_hierarchy_order():
    tasks = grid(3, 2, 4)
    scheduler = scheduler_for(tasks)
    assert [scheduler.assign("only") for _ in tasks] == tasks


def test_empty_scheduler():
    scheduler = _Scheduler(3)
    assert len(scheduler) == 0
    assert scheduler.assign(0) is None
    scheduler.release(0)
    scheduler.forget(0)


def test_release_and_forget_of_unknown_keys_are_harmless():
    scheduler = scheduler_for(grid(2, 2))
    scheduler.release("nobody")
    scheduler.forget("nobody")
    assert len(scheduler) == 4


def test_tasks_may_be_added_after_some_were_handed_out():
    scheduler = scheduler_for([(0, 0), (0, 1)])
    first = scheduler.assign(0)
    scheduler.add((1, 0))
    scheduler.add((0, 2))
    rest = [scheduler.assign(0) for _ in range(3)]
    assert scheduler.assign(0) is None
    assert sorted([first] + rest) == [(0, 0), (0, 1), (0, 2), (1, 0)]


# -- retention and spreading ---------------------------------------------------

def test_worker_keeps_its_top_level_value_while_it_has_tasks():
    history = simulate(grid(3, 5, 2), 3)
    for worker, tasks in history.items():
        assert len({task[0] for task in tasks}) == 1, (worker, tasks)
    assert sorted(tasks[0][0] for tasks in history.values()) == [0, 1, 2]


def test_longest_prefix_is_kept():
    scheduler = scheduler_for(grid(2, 2, 3))
    a = scheduler.assign("a")
    b = scheduler.assign("b")
    assert a[0] != b[0]
    # a finishes its task: next task keeps (model, dataset) while that has tasks
    assert scheduler.assign("a") == a[:2] + (1,)
    assert scheduler.assign("a") == a[:2] + (2,)
    # (model, dataset) exhausted: keeps model
    nxt = scheduler.assign("a")
    assert nxt[0] == a[0] and nxt[1] != a[1]


def test_fresh_workers_start_on_different_top_level_values():
    scheduler = scheduler_for(grid(4, 3, 3))
    firsts = [scheduler.assign(w) for w in range(4)]
    assert sorted(task[0] for task in firsts) == [0, 1, 2, 3]


def test_more_workers_than_top_level_values_cover_every_value_first():
    scheduler = scheduler_for(grid(2, 6))
    firsts = [scheduler.assign(w) for w in range(5)]
    assert {task[0] for task in firsts[:2]} == {0, 1}
    assert len(set(firsts)) == 5


def test_fresh_workers_skip_top_level_values_with_no_tasks_left():
    scheduler = scheduler_for(grid(3, 2))
    assert scheduler.assign("a") == (0, 0)
    assert scheduler.assign("a") == (0, 1)
    scheduler.forget("a")          # worker died; its branch is exhausted anyway
    b = scheduler.assign("b")
    c = scheduler.assign("c")
    assert {b[0], c[0]} == {1, 2}


def test_second_worker_on_a_single_value_takes_from_the_far_end():
    tasks = grid(1, 5, 4)
    scheduler = scheduler_for(tasks)
    assert scheduler.assign("owner") == tasks[0]
    assert scheduler.assign("helper") == tasks[-1]


def test_split_branch_meets_in_the_middle():
    tasks = grid(1, 5, 4)
    history = simulate(tasks, 2)
    owner, helper = history[0], history[1]
    assert owner[0] == tasks[0] and helper[0] == tasks[-1]
    assert owner == sorted(owner)                         # the owner keeps its order
    assert helper == sorted(helper, reverse=True)         # the helper works backwards
    assert_each_task_once(history, tasks)
    assert abs(len(owner) - len(helper)) <= 1


def test_worker_whose_branch_is_exhausted_goes_where_no_other_worker_is():
    # workers a, b, c on values 0, 1, 2; value 0 is short, 3 is still unvisited
    tasks = [(0, 0)] + [(v, i) for v in (1, 2, 3) for i in range(4)]
    scheduler = scheduler_for(tasks)
    assert [scheduler.assign(w)[0] for w in "abc"] == [0, 1, 2]
    assert scheduler.assign("a")[0] == 3


def test_forgotten_worker_releases_its_branch():
    scheduler = scheduler_for(grid(2, 4))
    first = scheduler.assign("dead")
    scheduler.forget("dead")
    # the branch it was on is free again: a new worker is not sent to split
    # the other branch's far end while the dead worker's branch is idle
    other = scheduler.assign("x")
    new = scheduler.assign("new")
    assert {other[0], new[0]} == {0, 1}
    assert first not in (other, new)


# -- loads with equal task durations -------------------------------------------

@pytest.mark.parametrize("shape, workers", [
    ((3, 40), 2),
    ((8, 3, 10), 4),
    ((10, 100, 10), 3),
    ((4, 13), 3),
    ((5, 2, 2), 5),
    ((7, 1), 2),
])
def test_top_level_loads_are_near_minimal(shape, workers):
    tasks = grid(*shape)
    history = simulate(tasks, workers)
    assert_each_task_once(history, tasks)
    top_values = shape[0]
    assert loads(history) <= top_values + workers - 1, loads(history)
    # with equal durations no worker idles while tasks remain
    counts = [len(t) for t in history.values()]
    assert max(counts) - min(counts) <= 1


def test_loads_with_uneven_branches():
    # exceptions make branches of different sizes
    tasks = [t for t in grid(6, 4, 5) if not (t[0] % 2 and t[1] > 0)]
    history = simulate(tasks, 3)
    assert_each_task_once(history, tasks)
    assert loads(history) <= 6 + 3 - 1


# -- hypothesis: every task handed out once, whatever the finishing order -------

@st.composite
def task_sets(draw):
    depth = draw(st.integers(min_value=1, max_value=4))
    shape = [draw(st.integers(min_value=1, max_value=4)) for _ in range(depth)]
    full = grid(*shape)
    keep = draw(st.lists(st.booleans(), min_size=len(full), max_size=len(full)))
    tasks = [task for task, kept in zip(full, keep) if kept] or full[:1]
    return depth, tasks


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(task_sets(), st.integers(min_value=1, max_value=6), st.data())
def test_every_task_handed_out_exactly_once(task_set, workers, data):
    depth, tasks = task_set
    scheduler = _Scheduler(depth, clock=lambda: 0.0)
    for task in tasks:
        scheduler.add(task)
    remaining = set(tasks)
    busy = {}             # worker key -> its current task
    last = {}             # worker key -> its previous task (for live workers)
    before = {}           # worker key -> the task before that
    handed = []
    waiting = set()       # workers told to wait: they ask again after each event
    next_key = itertools.count()

    def give(key):
        previous = last.get(key)
        if previous is not None:
            # the longest prefix of the previous task that still has tasks
            want = max([length for length in range(depth)
                        if any(task[:length] == previous[:length] for task in remaining)],
                       default=None)
        idle_tops = {task[0] for task in remaining} - \
            {task[0] for other, task in busy.items() if other != key}
        # as the main loop asks: patient only while another worker holds a task
        patient = any(other != key for other in busy)
        task = scheduler.assign(key, patient=patient)
        if task is None:
            assert patient or not remaining   # the workers never all wait
            if remaining:
                # every task takes 1 s, loads nothing, on a clock that stands
                # still (nothing looks stuck): the join limit is the only
                # reason to wait
                assert not all(scheduler.policy.may_join(level) for level in range(depth - 1))
                waiting.add(key)
            return
        assert task in remaining
        remaining.discard(task)
        handed.append(task)
        if previous is not None:
            assert common_prefix(task, previous) == want, (previous, task, want)
        if (previous is None or previous[0] != task[0]) and idle_tops:
            # a worker leaving (or without) a top-level value goes where no one is
            assert task[0] in idle_tops, (task, idle_tops)
        busy[key] = task
        before[key] = last.get(key)
        last[key] = task
        assert len(scheduler) == len(remaining)

    for _ in range(workers):
        give(next(next_key))
    history = {}          # key -> tasks it ran, for the bound
    disturbed = False     # a task came back unstarted, or a worker died
    while busy or waiting:
        for key in sorted(waiting):
            waiting.discard(key)
            give(key)
        if not busy:
            continue
        key = data.draw(st.sampled_from(sorted(busy)))
        task = busy.pop(key)
        fate = data.draw(st.integers(0, 9))
        disturbed = disturbed or fate >= 8
        if fate < 9:
            history.setdefault(key, []).append(task)
        if fate < 8:
            scheduler.release(key, seconds=1.0)
        if fate == 9:
            # a queued task comes back unstarted: it is handed out again later,
            # and its worker holds what the task before it left
            scheduler.put_back(key, task)
            remaining.add(task)
            handed.remove(task)
            last[key] = before[key]
            if last[key] is None:
                del last[key]
        elif fate == 8:
            # the worker dies; a replacement with a new key takes its slot
            scheduler.forget(key)
            del last[key]
            key = next(next_key)
        give(key)

    assert len(handed) == len(set(handed))
    assert sorted(handed) == sorted(tasks)
    assert len(scheduler) == 0
    assert scheduler.assign(next(next_key)) is None
    if depth > 1:
        assert not scheduler.root.children   # every branch went with its last task
    if not disturbed:
        assert_within_the_bound(history, tasks, workers)


def test_a_task_queued_ahead_leaves_the_running_one_counted():
    scheduler = scheduler_for(grid(2, 4))
    assert scheduler.assign("a") == (0, 0)
    assert scheduler.assign("a", ahead=True) == (0, 1)   # queued behind (0, 0)
    branch = scheduler.root.children[0]
    assert branch.active == 2
    scheduler.put_back("a", (0, 1))   # the queued one comes back unstarted
    assert branch.active == 1          # the running one still counts
    assert len(scheduler) == 7
    scheduler.release("a")             # the running one ends
    assert branch.active == 0
    assert scheduler.assign("a")[0] == 0   # it keeps the model it really holds
    assert scheduler.assign("b")[0] == 1   # a fresh worker goes where no one is


# -- waiting instead of a load that does not pay --------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_worker_waits_rather_than_load_for_a_branch_nearly_done():
    clock = Clock()
    scheduler = _Scheduler(2, clock=clock)
    for task in [(0, 0), (0, 1)] + [(1, i) for i in range(20)]:
        scheduler.add(task)
    assert scheduler.assign("a") == (0, 0)
    assert scheduler.assign("b") == (1, 0)
    assert scheduler.assign("c") == (1, 19)   # nothing measured yet: it joins
    clock.now = 10.0                           # 9.9 s loads, 0.1 s tasks
    for key in "abc":
        scheduler.release(key, seconds=10.0, load=9.9)
    assert scheduler.assign("a") == (0, 1)
    assert scheduler.assign("b") == (1, 1)
    assert scheduler.assign("c") == (1, 18)
    clock.now = 10.1
    scheduler.release("a", seconds=0.1)
    # 16 tasks of 0.1 s left for b and c: a 9.9 s load would not pay
    assert scheduler.assign("a") is None
    assert len(scheduler) == 16
    # it asks again after each event; the owners keep their order meanwhile
    scheduler.release("b", seconds=0.1)
    assert scheduler.assign("b") == (1, 2)
    assert scheduler.assign("a") is None
    # with its branch's workers gone, the branch has no one: a takes it over
    scheduler.forget("b")
    scheduler.forget("c")
    assert scheduler.assign("a") == (1, 3)


def test_a_worker_joins_a_busy_branch_when_its_load_pays_off():
    clock = Clock()
    scheduler = _Scheduler(2, clock=clock)
    for task in [(0, 0), (0, 1)] + [(1, i) for i in range(200)]:
        scheduler.add(task)
    assert [scheduler.assign(key) for key in "ab"] == [(0, 0), (1, 0)]
    clock.now = 2.0
    for key in "ab":
        scheduler.release(key, seconds=2.0, load=1.0)   # 1 s loads, 1 s tasks
    assert scheduler.assign("a") == (0, 1)
    assert scheduler.assign("b") == (1, 1)
    clock.now = 3.0
    scheduler.release("a", seconds=1.0)
    # b has some 198 s of work left: a 1 s load pays, from the far end
    assert scheduler.assign("a") == (1, 199)


def simulate_with_loads(tasks, workers, load, weigh=True, duration=lambda task: 1.0,
                        policy=None):
    """Tasks of ``duration`` (1 s); a task whose top-level value differs from
    its worker's previous one costs ``load`` more (``load`` may be a pair:
    the second is the cost when only the second-level value differs).  The
    scheduler is told each task's seconds.  ``weigh``: it weighs whether a
    load pays (else a worker joins a busy branch whenever the join limit
    lets it: joining at once).  Workers ask through hand_out, as in the main
    loop: those freed by the events at one time, and those told to wait.
    Returns ({worker: [task, ...]}, makespan)."""
    clock = Clock()
    scheduler = _Scheduler(len(tasks[0]), clock=clock,
                           policy=policy or _JoinPolicy(weigh=weigh))
    for task in tasks:
        scheduler.add(task)
    history = dict((w, []) for w in range(workers))
    events, idle, took = [], set(range(workers)), {}

    def start(worker, task):
        idle.discard(worker)
        held = history[worker]
        top, second = load if isinstance(load, tuple) else (load, 0.0)
        cost = top if not held or held[-1][0] != task[0] else \
            second if held[-1][:2] != task[:2] else 0.0
        held.append(task)
        took[worker] = (duration(task) + cost, cost)
        heapq.heappush(events, (clock.now + duration(task) + cost, worker))

    while True:
        for worker, task in list(scheduler.hand_out(sorted(idle), holding=bool(events))):
            if task is not None:
                start(worker, task)
        if not events:
            if not len(scheduler):
                break
            clock.now += threadward.WAIT_RECHECK   # the main loop's next pass
            continue
        clock.now, worker = heapq.heappop(events)
        finished = [worker]
        while events and events[0][0] == clock.now:
            finished.append(heapq.heappop(events)[1])
        for worker in finished:
            seconds, cost = took[worker]
            scheduler.release(worker, seconds=seconds, load=cost)
            idle.add(worker)
    assert len(scheduler) == 0
    return history, clock.now


def loads_per_level(history, depth):
    """How often each worker's prefix down to each level changes, counting
    its first: [top level, ..., the level above the last]."""
    counts = [0] * (depth - 1)
    for tasks in history.values():
        previous = None
        for task in tasks:
            for level in range(depth - 1):
                if previous is None or previous[:level + 1] != task[:level + 1]:
                    counts[level] += 1
            previous = task
    return counts


def assert_within_the_bound(history, tasks, workers):
    """At every level of P prefixes: at most P + W - 1 loads."""
    depth = len(tasks[0])
    bounds = [len({task[:level + 1] for task in tasks}) + workers - 1
              for level in range(depth - 1)]
    counts = loads_per_level(history, depth)
    assert all(count <= bound for count, bound in zip(counts, bounds)), (counts, bounds)


# Shapes where joining every busy branch whose load pays went over P + W - 1
# (more workers than models, and fewer: (5, 100) on 3 workers loaded 8 times).
OVER_THE_BOUND_WHEN_JOINING_FREELY = [
    ((2, 100), 3), ((3, 100), 5), ((5, 100), 3), ((8, 100), 3), ((10, 100), 16),
    ((4, 100), 6), ((2, 6, 10), 3), ((7, 6, 10), 12), ((11, 6, 10), 21)]


@pytest.mark.parametrize("shape, workers", [((3, 40), 8), ((3, 40), 16), ((2, 30), 5),
                                            ((4, 4, 4), 6)] + OVER_THE_BOUND_WHEN_JOINING_FREELY)
@pytest.mark.parametrize("weigh", [True, False])
def test_loads_stay_within_the_bound_at_every_level(shape, workers, weigh):
    tasks = grid(*shape)
    history, makespan = simulate_with_loads(tasks, workers, load_costs(shape), weigh=weigh)
    assert_each_task_once(history, tasks)
    assert_within_the_bound(history, tasks, workers)
    if weigh:   # waiting for a load that pays ends no later than joining at once
        _, blind = simulate_with_loads(tasks, workers, load_costs(shape), weigh=False)
        assert makespan <= blind * 1.001, (makespan, blind)


def load_costs(shape):
    """A model load costs 10 tasks, a dataset load (in deeper sweeps) 2."""
    return (10.0, 2.0) if len(shape) > 2 else 10.0


@pytest.mark.parametrize("shape, workers", OVER_THE_BOUND_WHEN_JOINING_FREELY[:5])
def test_the_join_limit_is_what_keeps_those_sweeps_within_the_bound(shape, workers):
    tasks = grid(*shape)
    _, limited = simulate_with_loads(tasks, workers, load_costs(shape))
    history, free = simulate_with_loads(tasks, workers, load_costs(shape),
                                        policy=_JoinPolicy(limit=False))
    assert loads(history) > shape[0] + workers - 1
    # what the bound costs there: a few percent of the sweep at most
    assert limited <= free * 1.08, (limited, free)


def test_varying_task_times_allow_more_joins():
    # lognormal task times: a branch's last tasks can run long, and joining
    # it is how the sweep catches up; the allowance grows with the spread
    runs = []
    for seed in range(6):
        rng = random.Random(seed)
        tasks = grid(6, 100)
        runs.append((tasks, {task: rng.lognormvariate(0.0, 1.0) for task in tasks}))

    def sweep(**rules):
        results = [simulate_with_loads(tasks, 9, 10.0, duration=seconds.get,
                                       policy=_JoinPolicy(**rules))
                   for tasks, seconds in runs]
        return max(loads(history) for history, _ in results), sum(m for _, m in results)

    most_loads, makespans = sweep()
    strict_most_loads, strict_makespans = sweep(spread=False, rescue=False)
    assert strict_most_loads <= 6 + 9 - 1 < most_loads
    assert makespans < strict_makespans * 0.98, (makespans, strict_makespans)


def after_first_tasks(tasks):
    """Workers a and b, started on models 0 and 1, have each run a first task
    of a 9.9 s load and 0.1 s of work: (clock at t = 10, scheduler)."""
    clock = Clock()
    scheduler = _Scheduler(2, clock=clock)
    for task in tasks:
        scheduler.add(task)
    assert [scheduler.assign(key) for key in "ab"] == [(0, 0), (1, 0)]
    clock.now = 10.0
    for key in "ab":
        scheduler.release(key, seconds=10.0, load=9.9)
    return clock, scheduler


def a_waits_for_b():
    """At t = 10: a's model is done; b works on the other, 8 tasks of 0.1 s
    not started, and a would need a 9.9 s load to join it: a waits."""
    clock, scheduler = after_first_tasks([(0, 0)] + [(1, i) for i in range(10)])
    assert scheduler.assign("b") == (1, 1)
    assert scheduler.assign("a") is None
    return clock, scheduler


def test_a_worker_waits_while_the_branch_works_and_joins_when_its_task_is_stuck():
    clock, scheduler = a_waits_for_b()
    # b's 0.1 s task has run 5 s: overdue, guessed to need as long again;
    # still less than a's 9.9 s load
    clock.now = 15.1
    assert scheduler.assign("a") is None
    # 11 s past its end: b may be stuck, and a 9.9 s load now pays
    clock.now = 21.1
    assert scheduler.assign("a") == (1, 9)


def test_an_impatient_ask_joins_even_when_the_load_does_not_pay():
    # the main loop asks so when no other worker holds a task: never all wait
    _, scheduler = a_waits_for_b()
    assert scheduler.assign("a", patient=False) == (1, 9)


def test_a_worker_joins_a_branch_whose_task_time_is_unknown():
    # waiting on a guess can cost far more than a load: "slow" has finished
    # no task yet, so its tasks might be long, and the worker joins
    clock = Clock()
    scheduler = _Scheduler(2, clock=clock)
    for task in [(0, i) for i in range(3)] + [(1, i) for i in range(4)]:
        scheduler.add(task)
    assert [scheduler.assign(key) for key in "ab"] == [(0, 0), (1, 0)]
    for step in range(3):
        clock.now += 1.0 if step else 10.0
        scheduler.release("a", seconds=1.0 if step else 10.0, load=0.0 if step else 9.0)
        if step < 2:
            assert scheduler.assign("a") == (0, step + 1)
    assert scheduler.assign("a") == (1, 3)


@pytest.mark.parametrize("fast, slow", [((40, 0.005), (4, 3.0)), ((200, 0.5), (8, 20.0)),
                                        ((1000, 0.5), (8, 60.0))])
@pytest.mark.parametrize("workers", [2, 3, 6, 8])
def test_waiting_does_not_slow_a_sweep_whose_models_differ_in_task_time(fast, slow, workers):
    # the task time of each branch is its own: a slow model's tasks are not
    # judged by a fast model's mean
    tasks = [(0, i) for i in range(fast[0])] + [(1, i) for i in range(slow[0])]
    seconds = {0: fast[1], 1: slow[1]}
    for load in (1.5, 30.0):
        _, makespan = simulate_with_loads(tasks, workers, load,
                                          duration=lambda task: seconds[task[0]])
        _, blind = simulate_with_loads(tasks, workers, load, weigh=False,
                                       duration=lambda task: seconds[task[0]])
        assert makespan <= blind * 1.01, (load, makespan, blind)


def test_a_task_taken_back_finds_its_branch_still_worked_on():
    # (0, 2) was queued behind (0, 1) and comes back unstarted at the end of
    # the sweep: its branch still has a's running task, so b, which would
    # need a 9.9 s load for a 0.1 s task, leaves it to a
    clock, scheduler = after_first_tasks([(0, 0), (0, 1), (0, 2), (1, 0)])
    assert scheduler.assign("a") == (0, 1)
    assert scheduler.assign("a", ahead=True) == (0, 2)
    assert scheduler.assign("b") is None      # nothing left
    scheduler.put_back("a", (0, 2))
    assert scheduler.root.children[0].active == 1
    assert scheduler.assign("b") is None      # waits: a is about to take it
    clock.now = 10.1
    scheduler.release("a", seconds=0.1)
    assert scheduler.assign("a") == (0, 2)
    scheduler.release("a", seconds=0.1)
    assert scheduler.root.children == {} and len(scheduler) == 0


@pytest.mark.parametrize("shape, workers, loads", [
    ((5, 5, 5), 8, (30.0, 10.0)), ((2, 3, 20), 4, (130.0, 10.0)), ((3, 4, 10), 4, (30.0, 10.0)),
    ((2, 3, 20), 3, (30.0, 2.0)), ((2, 8, 5), 8, (5.0, 2.0))])
def test_waiting_does_not_slow_deeper_sweeps(shape, workers, loads):
    # a worker's own branch may need loads below too (a dataset under a model)
    tasks = grid(*shape)
    history, makespan = simulate_with_loads(tasks, workers, loads)
    _, blind = simulate_with_loads(tasks, workers, loads, weigh=False)
    assert_each_task_once(history, tasks)
    assert makespan <= blind * 1.01, (makespan, blind)


def test_past_the_join_limit_a_worker_joins_only_a_branch_whose_task_is_stuck():
    # a hung task must not keep the others off its branch for good
    clock = Clock()
    scheduler = _Scheduler(2, clock=clock)
    for task in grid(1, 2) + [(1, i) for i in range(10)]:
        scheduler.add(task)
    assert [scheduler.assign(key) for key in "ab"] == [(0, 0), (1, 0)]
    clock.now = 1.0
    for key in "ab":
        scheduler.release(key, seconds=1.0)
    assert [scheduler.assign(key) for key in "ab"] == [(0, 1), (1, 1)]
    clock.now = 2.0
    scheduler.release("a", seconds=1.0)
    scheduler.policy.joins[0] = 5                 # the limit spent (as by earlier joins)
    assert scheduler.assign("a") is None    # b's branch is busy, its task not late
    clock.now = 2.9                         # b's 1 s task has run 1.9 s
    assert scheduler.assign("a") is None
    clock.now = 3.1                         # over twice the longest task: stuck
    assert scheduler.assign("a") == (1, 9)


def test_a_join_whose_task_comes_back_unstarted_is_not_counted():
    scheduler = scheduler_for(grid(2, 10))
    assert [scheduler.assign(key) for key in "ab"] == [(0, 0), (1, 0)]
    assert scheduler.assign("c") == (0, 9)          # a join
    assert scheduler.policy.joins[0] == 1
    scheduler.put_back("c", (0, 9))                  # never started: nothing loaded
    assert scheduler.policy.joins[0] == 0


def test_entering_a_branch_another_worker_left_unfinished_counts_as_a_join():
    # a worker died in it: the branch is free to take, and loaded once more
    scheduler = scheduler_for(grid(2, 10))
    assert [scheduler.assign(key) for key in "ab"] == [(0, 0), (1, 0)]
    scheduler.forget("a")
    assert scheduler.assign("c") == (0, 1)
    assert scheduler.policy.joins[0] == 1


def test_kept_is_how_much_of_its_prefix_a_worker_finds_left():
    scheduler = scheduler_for(grid(2, 2, 2))
    assert scheduler.kept("new") == 0
    assert scheduler.assign("a") == (0, 0, 0)
    assert scheduler.kept("a") == 2
    assert scheduler.assign("a") == (0, 0, 1)
    assert scheduler.kept("a") == 1      # dataset (0, 0) is done, model 0 is not


def test_a_task_that_loads_is_not_stuck_before_ten_times_the_longest_load():
    # a's dataset load has never been measured: its first task in dataset 1
    # is judged by the model load measured (10 s), ten times over (another
    # prefix may load far slower), not as a 1 s task
    clock = Clock()
    scheduler = _Scheduler(3, clock=clock)
    for task in grid(1, 2, 4):
        scheduler.add(task)
    assert scheduler.assign("a") == (0, 0, 0)
    clock.now = 11.0
    scheduler.release("a", seconds=11.0, load=10.0)
    for seed in (1, 2, 3):
        assert scheduler.assign("a") == (0, 0, seed)
        clock.now += 1.0
        scheduler.release("a", seconds=1.0)
    assert scheduler.assign("a") == (0, 1, 0)   # given at t = 14
    model = scheduler.root.children[0]
    clock.now = 37.0
    assert scheduler.policy.rescue(model, 1) == set()
    clock.now = 217.0                              # 203 s: over 2 x (10 x 10 + 1) s
    assert scheduler.policy.rescue(model, 1) == {1}


def test_a_slow_load_does_not_draw_a_worker_past_the_limit_while_others_run():
    # model 1 loads for long (its load unmeasured, longer than model 0's),
    # but c runs model 2 as expected: a waits rather than load model 1 too
    clock = Clock()
    scheduler = _Scheduler(2, clock=clock)
    for task in [(0, 0), (0, 1)] + [(1, i) for i in range(10)] + [(2, i) for i in range(3)]:
        scheduler.add(task)
    assert [scheduler.assign(key) for key in "abc"] == [(0, 0), (1, 0), (2, 0)]
    clock.now = 6.0
    for key in "ac":
        scheduler.release(key, seconds=6.0, load=5.0)
    assert [scheduler.assign(key) for key in "ac"] == [(0, 1), (2, 1)]
    clock.now = 7.0
    scheduler.release("a", seconds=1.0)
    scheduler.policy.joins[0] = 5                     # the limit spent
    clock.now = 20.0                             # b has loaded for 20 s, a's took 5
    scheduler.release("c", seconds=13.0)         # c's task ran long, as tasks do
    assert scheduler.assign("c") == (2, 2)       # and goes on as expected
    assert scheduler.assign("a") is None
    clock.now = 21.0
    scheduler.release("c", seconds=1.0)
    # nothing else runs now; b's task is judged by the longest load (5 s)
    # ten times over and the longest task (13 s): stuck once it has run 126 s
    assert scheduler.assign("a") is None
    clock.now = 125.0
    assert scheduler.assign("a") is None
    clock.now = 126.5
    assert scheduler.assign("a") == (1, 9)


def test_a_task_queued_ahead_is_timed_from_its_start():
    clock = Clock()
    scheduler = _Scheduler(2, clock=clock)
    for task in grid(1, 3):
        scheduler.add(task)
    assert scheduler.assign("a") == (0, 0)
    assert scheduler.assign("a", ahead=True) == (0, 1)
    clock.now = 5.0
    scheduler.release("a", seconds=5.0)
    assert scheduler.held["a"][0].since == 5.0     # it started when (0, 0) ended


def test_a_task_queued_into_an_untouched_branch_and_taken_back_leaves_it_untouched():
    scheduler = scheduler_for(grid(2, 1))
    assert scheduler.assign("a") == (0, 0)
    # a's model is done; it queues into model 1, untouched, and gets it back
    assert scheduler.assign("a", ahead=True) == (1, 0)
    scheduler.put_back("a", (1, 0))
    assert not scheduler.root.children[1].entered
    assert scheduler.assign("b") == (1, 0)
    assert scheduler.policy.joins[0] == 0              # b's entry is not a join

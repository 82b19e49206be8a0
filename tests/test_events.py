"""task_queue/events.jsonl, schema 2: what `threadward report` draws.

Real runs of the CLI; tasks count their converter calls and attempts in
files, so every figure checked is one the run itself produced.
"""

import json
import os

import threadward
from conftest import TASK_IMPORTS_WAIT_FOR, started, wait_for


def events(project):
    with open(os.path.join(project.queue, "events.jsonl")) as stream:
        return [json.loads(line) for line in stream]


def of_kind(record, kind):
    return [event for event in record if event["event"] == kind]


# Two models x three seeds on two workers.  The converter of "model" appends
# a line to calls/model each time it runs; task a/1 fails on its first
# attempt and RETRIES = 1 runs it again.
SWEEP_TASK = """
import os

RETRIES = 1
SIGTERM_GRACE = float("inf")


def task_method(variables, task_folder, log_file):
    path = os.path.join(task_folder, "attempts")
    count = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as stream:
        stream.write(str(count))
    if (variables["model"], variables["seed"]) == ("loaded a", 1) and count == 1:
        raise ValueError("diverged")
"""

SWEEP_VARIABLES = """
import os

CALLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "calls")


def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["a", "b"])
    variable_set.add_variable(name="seed", values=[0, 1, 2])


def model_to_value(string_value, nickname):
    os.makedirs(CALLS, exist_ok=True)
    with open(os.path.join(CALLS, "model"), "a") as stream:
        stream.write(string_value + "\\n")
    return "loaded " + string_value
"""


def test_a_run_records_its_header_workers_tasks_and_end(project):
    project.write(task=SWEEP_TASK, variables=SWEEP_VARIABLES, resources="NUM_WORKERS = 2\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    record = events(project)
    run = record[0]
    assert run["event"] == "run" and run["schema"] == threadward.EVENTS_SCHEMA == 2
    assert all(event["run"] == run["run"] for event in record)
    assert [event["time"] for event in record] == sorted(event["time"] for event in record)
    names = [name for names in threadward.SETTINGS.values() for name in names]
    assert list(run["settings"]) == names
    assert run["settings"]["RETRIES"] == 1 and run["settings"]["NUM_WORKERS"] == 2
    assert run["settings"]["SIGTERM_GRACE"] == "inf"   # JSON has no infinity
    assert run["variables"] == [{"name": "model", "converter": True},
                                {"name": "seed", "converter": False}]
    assert (run["workers"], run["gpus"], run["tasks"]) == (2, [], 6)

    workers = of_kind(record, "worker")
    for worker_id in (0, 1):
        mine = [e for e in workers if e["worker"] == worker_id]
        assert [e["state"] for e in mine] == ["start", "ready", "stop", "exit"]
        assert (mine[0]["why"], mine[0]["slot"], mine[0]["replaces"]) == ("start", worker_id,
                                                                          None)
        assert mine[1]["pid"] > 0
        assert (mine[3]["cause"], mine[3]["code"]) == ("shut down", 0)
        # after its last task (if it ran one: the other may have run them all)
        assert mine[2]["time"] >= max([e["time"] for e in of_kind(record, "task")
                                       if e["worker"] == worker_id], default=0)

    # every attempt: handed out, started, ended, on one worker, in that order
    ends = of_kind(record, "task")
    assert sorted((e["id"], e["attempt"], e["status"]) for e in ends) == [
        ("a/0", 1, "succeeded"), ("a/1", 1, "retrying"), ("a/1", 2, "succeeded"),
        ("a/2", 1, "succeeded"), ("b/0", 1, "succeeded"), ("b/1", 1, "succeeded"),
        ("b/2", 1, "succeeded")]
    for end in ends:
        # before its end: its last hand-out, and the start noted since (none came back)
        mine = [e for e in record[:record.index(end)] if e.get("id") == end["id"]
                and e["event"] in ("hand", "start", "back")]
        last_hand = max(i for i, e in enumerate(mine) if e["event"] == "hand")
        assert [e["event"] for e in mine[last_hand:]] == ["hand", "start"], mine
        assert mine[-1]["attempt"] == end["attempt"]
        assert mine[last_hand]["worker"] == mine[-1]["worker"] == end["worker"]
    # what came back had been handed out to that worker, and was handed out again
    # (a retry queued behind a running task can come back too: a task may be
    # handed out more than twice)
    for back in of_kind(record, "back"):
        at = record.index(back)
        hands = [i for i, e in enumerate(record) if e["event"] == "hand"
                 and e["id"] == back["id"]]
        before = [i for i in hands if i < at]
        assert before and record[before[-1]]["worker"] == back["worker"], back
        assert any(i > at for i in hands), back

    # "converted" says where the converter of level 0 ran: as often as it did
    with open(os.path.join(project.dir, "calls", "model")) as stream:
        calls = stream.read().split()
    loaded = [e for e in ends if e.get("converted")]
    assert all(e["converted"] == [0] and e["load"] > 0 for e in loaded)
    assert len(loaded) == len(calls) >= 2
    assert all("converted" not in e for e in ends if e not in loaded)

    end = record[-1]
    assert end["event"] == "end"
    assert (end["succeeded"], end["failed"], end["not_run"], end["retried"], end["stopped"]) \
        == (6, 0, 0, 1, None)


DYING_TASK = """
import os


def task_method(variables, task_folder, log_file):
    if variables["x"] == 1 and not os.path.exists(os.path.join(task_folder, "died")):
        open(os.path.join(task_folder, "died"), "w").close()
        os._exit(3)
"""


def test_a_worker_that_dies_is_recorded_with_its_cause_and_its_replacement(project):
    project.write(task=DYING_TASK + "RETRIES = 1\n", resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    workers = of_kind(events(project), "worker")
    assert [(e["worker"], e["state"]) for e in workers] == [
        (0, "start"), (0, "ready"), (0, "exit"),   # it died: never told to stop
        (1, "start"), (1, "ready"), (1, "stop"), (1, "exit")]
    assert (workers[2]["cause"], workers[2]["code"]) == ("worker 0 exited with code 3", 3)
    assert (workers[3]["why"], workers[3]["replaces"]) == ("replace", 0)
    assert workers[6]["cause"] == "shut down"


def test_a_stopped_run_says_why_in_its_end_and_a_failed_start_is_an_exit(project):
    project.write(task=SHORT_TASK + """
def before_each_worker(worker_id):
    raise ImportError("no such model library")
""", resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 1
    record = events(project)
    exits = [e for e in of_kind(record, "worker") if e["state"] == "exit"]
    assert exits and all(e["cause"].startswith("could not start: ") for e in exits)
    assert "no such model library" in exits[0]["cause"]
    assert record[-1]["event"] == "end"
    assert record[-1]["not_run"] == 3 and record[-1]["stopped"] == "no worker could start"


SHORT_TASK = """
def task_method(variables, task_folder, log_file):
    pass
"""


def test_short_tasks_are_queued_ahead_and_start_when_the_one_before_ends(project):
    project.write(task=SHORT_TASK, resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(200)))
""")
    assert project.run().returncode == 0
    record = events(project)
    hands = of_kind(record, "hand")
    assert len(hands) == 200 and any(e["queued"] for e in hands)
    starts = of_kind(record, "start")
    # One worker runs one task at a time. The next queued task's start is
    # noted when the answer before it arrives, just before that answer's
    # "task" line: so at most two are open at any line, never three.
    running = set()
    for event in record:
        if event["event"] == "start":
            running.add(event["id"])
            assert len(running) <= 2, event
        elif event["event"] == "task":
            running.remove(event["id"])
    assert not running
    for hand in hands:
        if hand["queued"]:   # sent while the one before ran: it starts later
            start = next(e for e in starts if e["id"] == hand["id"])
            assert start["time"] >= hand["time"]


def test_resource_samples_name_each_worker(project):
    gate = os.path.join(project.dir, "gate")
    project.write(task=TASK_IMPORTS_WAIT_FOR + """
import os
GATE = %r


def task_method(variables, task_folder, log_file):
    wait_for(lambda: os.path.exists(GATE), timeout=120)
""" % gate, resources="NUM_WORKERS = 2\n")
    with started(project) as process:
        path = os.path.join(project.queue, "events.jsonl")

        def two_samples():
            with open(path) as stream:
                return stream.read().count('"event": "sample"') >= 2
        wait_for(lambda: os.path.exists(path) and two_samples(), timeout=60)
        open(gate, "w").close()
        process.communicate(timeout=60)
    samples = of_kind(events(project), "sample")
    last = samples[1]["workers"]
    assert sorted(last) == ["0", "1"]
    for figures in last.values():
        assert figures["rss"] > 1 << 20 and figures["cpu"] >= 0 and figures["gpu"] is None


def test_the_first_sample_of_a_busy_worker_reads_busy(project):
    # psutil's first cpu_percent of a process has nothing to measure against
    # and says 0.0; the first sample is the worker's CPU over its life so far.
    project.write(task="""
import os
EVENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "task_queue", "events.jsonl")


def task_method(variables, task_folder, log_file):
    while '"event": "sample"' not in open(EVENTS).read():   # busy until sampled
        pass
""", resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[0])
""")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    first = of_kind(events(project), "sample")[0]["workers"]["0"]
    # the worker spun from its first task to this sample, after its start
    assert first["cpu"] >= 20, first

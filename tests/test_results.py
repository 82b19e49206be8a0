"""The results table (threadward.results, `threadward results`), the event
record task_queue/events.jsonl it reads, and RETRIES.

Every case runs the real CLI on a temporary project.  Tasks that must fail
a given number of times count their attempts in a file of their own task
folder, so nothing depends on timing.
"""

import csv
import io
import json
import os

import threadward

from conftest import sigterm_task_zero


def console(result):
    return result.stdout + result.stderr


def events(project):
    """The lines of events.jsonl, parsed."""
    with open(os.path.join(project.queue, "events.jsonl")) as stream:
        return [json.loads(line) for line in stream.read().splitlines()]


def task_events(project, task_id):
    return [e for e in events(project) if e["event"] == "task" and e["id"] == task_id]


# A task that fails (as FAIL says) on its first FAILURES attempts, counting
# them in its own folder; "exit" ends the worker instead of raising.
COUNTED = """
import os

RETRIES = %(retries)d


def task_method(variables, task_folder, log_file):
    path = os.path.join(task_folder, "attempts")
    count = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as stream:
        stream.write(str(count))
    if variables["x"] == 0 and count <= %(failures)d:
        if %(exit)r:
            os._exit(3)
        raise ValueError("attempt %%d" %% count)
    return {"attempts_seen": count}
"""

ONE_VARIABLE = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[0, 1, 2])
"""


def counted(retries, failures, exit=False):
    return COUNTED % {"retries": retries, "failures": failures, "exit": exit}


# --------------------------------------------------------------------------
# results(): one row per task, in generation order
# --------------------------------------------------------------------------

SWEEP_VARIABLES = """
FAILURE_HANDLING = "STOP_EXECUTION"


def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["a", "b"], nicknames=["A", "B"])
    variable_set.add_variable(name="seed", values=[0, 1, 2])
"""

SWEEP_TASK = """
import json
import os

SUCCESS_CONDITION = "NO_ERROR_ONLY"


def task_method(variables, task_folder, log_file):
    seed = variables["seed"]
    if seed == 0:
        # "seed" is also a variable's name: the table calls it result.seed
        return {"score": 0.5, "seed": "mine", "curve": [1, 2]}
    if seed == 1:
        with open(os.path.join(task_folder, "result.json"), "w") as stream:
            json.dump({"own": True}, stream)
        return None
    raise ValueError("seed %d diverged" % seed)
"""


def test_results_has_a_row_per_task_in_generation_order(project):
    """A success that returned a dict, one that wrote its own result.json,
    a failure, and (STOP_EXECUTION on one worker) three tasks not run."""
    project.write(task=SWEEP_TASK, variables=SWEEP_VARIABLES, resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 1, console(result)

    rows = threadward.results(project.dir)
    assert [row["task_id"] for row in rows] == ["A/0", "A/1", "A/2", "B/0", "B/1", "B/2"]
    assert [row["status"] for row in rows] == ["succeeded", "succeeded", "failed"] + \
        ["not run"] * 3
    assert [row["attempts"] for row in rows] == [1, 1, 1, 0, 0, 0]
    assert rows[2]["reason"] == "ValueError: seed 2 diverged"
    assert [row["reason"] for row in rows[:2] + rows[3:]] == [""] * 5
    assert all(isinstance(row["seconds"], float) and row["seconds"] >= 0 for row in rows[:3])
    assert [row["seconds"] for row in rows[3:]] == [None] * 3

    # the fixed columns, the variables with their declared values, the result's keys
    assert list(rows[0]) == ["task_id", "status", "reason", "seconds", "attempts",
                             "model", "seed", "score", "result.seed", "curve"]
    assert (rows[0]["model"], rows[0]["seed"], rows[0]["score"], rows[0]["result.seed"],
            rows[0]["curve"]) == ("a", 0, 0.5, "mine", [1, 2])
    assert list(rows[1])[5:] == ["model", "seed", "own"] and rows[1]["own"] is True
    assert list(rows[2])[5:] == list(rows[3])[5:] == ["model", "seed"]
    assert (rows[4]["model"], rows[4]["seed"]) == ("b", 1)

    # result.json as the task returned it; the one it wrote itself is kept
    assert json.loads(project.output("A", "0", "result.json")) == {
        "score": 0.5, "seed": "mine", "curve": [1, 2]}
    assert json.loads(project.output("A", "1", "result.json")) == {"own": True}
    # what pandas.DataFrame(rows) needs: a list of flat dicts
    assert all(type(row) is dict for row in rows)


def test_a_rerun_leaves_no_result_of_the_run_before_in_the_table(project):
    """--fresh after a sweep that succeeded: a task that fails now has no
    result (its old result.json is removed as it starts), and those that
    STOP_EXECUTION left unrun show none (their folders keep the old files)."""
    project.write(task="""
def task_method(variables, task_folder, log_file):
    return {"score": variables["x"]}
""", variables=ONE_VARIABLE)
    assert project.run().returncode == 0
    assert [row["score"] for row in threadward.results(project.dir)] == [0, 1, 2]
    project.write(task="""
def task_method(variables, task_folder, log_file):
    raise ValueError("broken now")
""", variables='FAILURE_HANDLING = "STOP_EXECUTION"\n' + ONE_VARIABLE,
                  resources="NUM_WORKERS = 1\n")
    assert project.run("--fresh").returncode == 1
    rows = threadward.results(project.dir)
    assert [row["status"] for row in rows] == ["failed", "not run", "not run"]
    assert all("score" not in row for row in rows), rows
    assert not os.path.exists(os.path.join(project.outputs, "0", "result.json"))
    assert os.path.exists(os.path.join(project.outputs, "1", "result.json"))   # not touched


def test_what_a_task_returns_that_is_not_a_dict_of_json_values(project):
    """Anything else is not saved (and the task still succeeds: it said so in
    its log); a dict that JSON cannot hold fails the task with the reason;
    numpy-like values (with .tolist()) are converted."""
    project.write(task="""
SUCCESS_CONDITION = "NO_ERROR_ONLY"


class Scalar(object):      # what numpy scalars and torch tensors offer
    def tolist(self):
        return 0.25


def task_method(variables, task_folder, log_file):
    x = variables["x"]
    if x == 0:
        return 42
    if x == 1:
        return {"model": object()}
    return {"loss": Scalar(), "nan": float("nan")}
""", variables=ONE_VARIABLE)
    result = project.run()
    assert result.returncode == 1, console(result)
    assert sorted(project.successful()) == ["0", "2"]
    assert "task_method returned int, not a dict: it is not saved" in project.log("0")
    assert not os.path.exists(os.path.join(project.outputs, "0", "result.json"))
    reason = project.failed()["1"]
    assert reason.startswith("TypeError: task_method returned a dict that cannot be saved as "
                             "result.json (object is not a JSON value); return numbers")
    row = threadward.results(project.dir)[2]
    assert row["loss"] == 0.25 and row["nan"] != row["nan"]


# --------------------------------------------------------------------------
# `threadward results`: CSV, JSON lines, markdown; --where
# --------------------------------------------------------------------------

TABLE_TASK = """
SUCCESS_CONDITION = "NO_ERROR_ONLY"


def task_method(variables, task_folder, log_file):
    if variables["model"] == "gpt2" and variables["seed"] == 1:
        raise RuntimeError("out of memory | again")
    return {"score": len(variables["model"]) + variables["seed"], "ok": True}
"""

TABLE_VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["gpt2", "meta-llama/Llama-3.1-8B"],
                              nicknames=["GPT2", "Llama"])
    variable_set.add_variable(name="seed", values=[0, 1])
"""

TABLE_IDS = ["GPT2/0", "GPT2/1", "Llama/0", "Llama/1"]


def table_project(project):
    project.write(task=TABLE_TASK, variables=TABLE_VARIABLES)
    result = project.run()
    assert result.returncode == 1, console(result)
    return threadward.results(project.dir)


def results_cli(project, *args):
    return project.run(*args, subcommand="results")


def test_cli_prints_csv_by_default(project):
    rows = table_project(project)
    result = results_cli(project)
    assert result.returncode == 0, console(result)
    assert result.stderr == ""
    parsed = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["task_id"] for row in parsed] == TABLE_IDS
    assert list(parsed[0]) == ["task_id", "status", "reason", "seconds", "attempts",
                               "model", "seed", "score", "ok"]
    for mine, theirs in zip(parsed, rows):
        assert mine == {key: "" if theirs.get(key) is None else str(theirs.get(key))
                        for key in mine}
    assert parsed[1]["status"] == "failed" and parsed[1]["score"] == ""
    assert parsed[1]["reason"] == "RuntimeError: out of memory | again"
    assert parsed[2]["model"] == "meta-llama/Llama-3.1-8B"


def test_cli_prints_json_lines(project):
    rows = table_project(project)
    result = results_cli(project, "--format", "jsonl")
    assert result.returncode == 0, console(result)
    assert [json.loads(line) for line in result.stdout.splitlines()] == rows


def test_cli_prints_a_markdown_table(project):
    table_project(project)
    result = results_cli(project, "--format", "markdown")
    assert result.returncode == 0, console(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 + len(TABLE_IDS)
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[:1] + lines[2:])
    assert lines[1] == "|" + "---|" * 9

    def cells(line):   # a "|" inside a cell is written "\|"
        return [cell.strip().replace("\\|", "|")
                for cell in line[1:-1].replace("\\|", "\0").split("|")]
    assert cells(lines[0]) == ["task_id", "status", "reason", "seconds", "attempts",
                               "model", "seed", "score", "ok"]
    body = [[cell.replace("\0", "|") for cell in cells(line)] for line in lines[2:]]
    assert all(len(row) == 9 for row in body)
    assert [row[0] for row in body] == TABLE_IDS
    assert body[1][2] == "RuntimeError: out of memory | again"


def test_cli_where_selects_by_value_nickname_and_status(project):
    table_project(project)

    def selected(*conditions):
        args = []
        for condition in conditions:
            args += ["--where", condition]
        result = results_cli(project, "--format", "jsonl", *args)
        assert result.returncode == 0, console(result)
        return [json.loads(line)["task_id"] for line in result.stdout.splitlines()]
    assert selected("model=gpt2") == ["GPT2/0", "GPT2/1"]                 # by value
    assert selected("model=Llama") == ["Llama/0", "Llama/1"]              # by nickname
    assert selected("model=meta-llama/Llama-3.1-8B", "seed=1") == ["Llama/1"]
    assert selected("seed=0", "seed=1", "model=GPT2") == ["GPT2/0", "GPT2/1"]  # either seed
    assert selected("status=failed") == ["GPT2/1"]
    assert selected("ok=True") == selected("ok=true") == ["GPT2/0", "Llama/0", "Llama/1"]
    assert selected("score=0.25") == []   # a result no task has (yet): no row

    result = results_cli(project, "--where", "status=not run")   # still a header
    assert result.stdout.splitlines() == ["task_id,status,reason,seconds,attempts,model,seed,"
                                          "score,ok"]
    for bad, says in (("colour=red", "--where colour: no such column; the columns are: "
                                     "task_id, status"),
                      ("model", "--where 'model': write NAME=VALUE"),
                      # a variable's value no task has: a slip, as with run --only
                      ("model=bert", "--where model=bert: no task has that model; its values "
                                     "are: GPT2, Llama")):
        result = results_cli(project, "--where", bad)
        assert result.returncode == 2 and result.stdout == ""
        assert says in result.stderr


def test_cli_on_a_project_never_run_says_so(project):
    result = results_cli(project)
    assert result.returncode == 2
    assert "has no tasks yet: the project has not been run; `threadward run` writes it" \
        in result.stderr


# --------------------------------------------------------------------------
# events.jsonl, and results() from it and from the result files
# --------------------------------------------------------------------------

def test_events_record_each_run_and_task_end(project):
    project.write(task=counted(retries=0, failures=1), variables=ONE_VARIABLE)
    assert project.run().returncode == 1
    assert project.run().returncode == 0   # the rerun: x=0 succeeds on its second try
    record = events(project)
    runs = [e for e in record if e["event"] == "run"]
    assert [(r["tasks"], r["skipped"], r["fresh"]) for r in runs] == [(3, 0, False),
                                                                      (1, 2, False)]
    assert runs[0]["run"] != runs[1]["run"]
    first = [e for e in record if e["event"] == "task" and e["run"] == runs[0]["run"]]
    assert sorted((e["id"], e["status"]) for e in first) == [
        ("0", "failed"), ("1", "succeeded"), ("2", "succeeded")]
    for event in first:
        assert list(event) == ["event", "run", "time", "id", "status", "reason", "seconds",
                               "load", "attempt", "worker"]
        assert event["attempt"] == 1 and event["worker"] in (0, 1) and event["seconds"] >= 0
    assert [e["reason"] for e in first if e["id"] == "0"] == ["ValueError: attempt 1"]

    # the latest run that ran a task gives its outcome; 1 and 2 keep run 1's
    rows = threadward.results(project.dir)
    assert [(r["status"], r["attempts"]) for r in rows] == [("succeeded", 1)] * 3
    assert [r["seconds"] for r in rows] == [task_events(project, str(x))[-1]["seconds"]
                                            for x in range(3)]


def test_a_torn_last_event_is_ignored_and_dropped_by_the_next_run(project):
    project.write(task=counted(retries=0, failures=0), variables=ONE_VARIABLE)
    assert project.run().returncode == 0
    path = os.path.join(project.queue, "events.jsonl")
    with open(path, "a") as stream:   # a crash mid-write
        stream.write('{"event": "task", "run": "x", "id": "0", "status": "fai')
    assert [r["status"] for r in threadward.results(project.dir)] == ["succeeded"] * 3

    assert project.run("--fresh").returncode == 0
    with open(path) as stream:
        text = stream.read()
    assert text.endswith("}\n") and '"fai\n' not in text and "fai{" not in text
    assert [e["event"] for e in events(project)].count("run") == 2
    # from the --fresh run on only: each task ran once more, attempt 1
    assert [(r["status"], r["attempts"]) for r in threadward.results(project.dir)] == \
        [("succeeded", 1)] * 3


def test_results_of_a_project_run_before_events_existed(project):
    """No events.jsonl: the outcome comes from successful/failed_tasks.txt,
    seconds unknown."""
    project.write(task=counted(retries=0, failures=1), variables=ONE_VARIABLE)
    assert project.run().returncode == 1
    os.unlink(os.path.join(project.queue, "events.jsonl"))
    rows = threadward.results(project.dir)
    assert [(r["task_id"], r["status"], r["reason"], r["seconds"], r["attempts"])
            for r in rows] == [("0", "failed", "ValueError: attempt 1", None, 1),
                               ("1", "succeeded", "", None, 1),
                               ("2", "succeeded", "", None, 1)]
    assert rows[1]["attempts_seen"] == 1


# --------------------------------------------------------------------------
# RETRIES
# --------------------------------------------------------------------------

def test_a_task_that_fails_twice_then_succeeds_with_two_retries(project):
    project.write(task=counted(retries=2, failures=2), variables=ONE_VARIABLE)
    result = project.run()
    assert result.returncode == 0, console(result)
    out = result.stdout
    assert "retrying 0 (attempt 2 of 3): ValueError: attempt 1" in out
    assert "retrying 0 (attempt 3 of 3): ValueError: attempt 2" in out
    assert "FAILED" not in out
    assert "done in" in out and "3 succeeded, 0 failed, 2 retries" in out
    # the result files hold the final outcome only
    assert sorted(project.successful()) == ["0", "1", "2"]
    assert project.failed() == {}
    row = threadward.results(project.dir)[0]
    assert (row["status"], row["attempts"], row["attempts_seen"]) == ("succeeded", 3, 3)
    assert [(e["status"], e["attempt"]) for e in task_events(project, "0")] == [
        ("retrying", 1), ("retrying", 2), ("succeeded", 3)]
    # `show` counts them too (its last view, in status.json)
    with open(os.path.join(project.queue, "status.json")) as stream:
        assert "; 2 retries" in json.load(stream)["show"]


def test_a_retried_tasks_log_keeps_every_attempt_and_a_new_run_starts_it_afresh(project):
    project.write(task=counted(retries=2, failures=2), variables=ONE_VARIABLE)
    assert project.run().returncode == 0
    log = project.output("0", "task.log")
    marks = [log.index(text) for text in (
        "ValueError: attempt 1", "==== threadward: attempt 2", "ValueError: attempt 2",
        "==== threadward: attempt 3")]
    assert marks == sorted(marks), log   # in the order they ran
    assert log.count("Traceback") == 2 and "attempt 4" not in log
    assert "==== threadward" not in project.output("1", "task.log")   # one attempt: as before
    assert project.run("--fresh").returncode == 0   # attempt 4 succeeds at once
    assert "==== threadward" not in project.output("0", "task.log")


def test_a_task_that_always_fails_is_failed_after_retries_plus_one_attempts(project):
    project.write(task=counted(retries=1, failures=99), variables=ONE_VARIABLE)
    result = project.run()
    assert result.returncode == 1, console(result)
    assert "retrying 0 (attempt 2 of 2): ValueError: attempt 1" in result.stdout
    assert "attempt 3" not in result.stdout
    assert "FAILED 0: ValueError: attempt 2" in result.stdout
    assert project.failed() == {"0": "ValueError: attempt 2"}
    assert project.lines("failed_tasks.txt") == ["0\tValueError: attempt 2"]
    row = threadward.results(project.dir)[0]
    assert (row["status"], row["reason"], row["attempts"]) == (
        "failed", "ValueError: attempt 2", 2)


def test_an_interrupted_task_is_not_retried(project, tmp_path):
    """A SIGTERM from outside to a worker (preemption of a step) interrupts
    its task: recorded once, `interrupted`, whatever RETRIES says."""
    returncode, out, err = sigterm_task_zero(project, tmp_path, ONE_VARIABLE, "RETRIES = 3")
    assert returncode == 1, out + err
    assert "retrying" not in out
    assert project.failed() == {"0": "interrupted"}
    assert [(e["status"], e["attempt"]) for e in task_events(project, "0")] == [
        ("interrupted", 1)]
    row = threadward.results(project.dir)[0]
    assert (row["status"], row["reason"], row["attempts"]) == ("failed", "interrupted", 1)


def test_a_task_whose_worker_died_runs_again_on_its_replacement(project):
    project.write(task=counted(retries=1, failures=1, exit=True), variables=ONE_VARIABLE,
                  resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 0, console(result)
    out = result.stdout
    assert "retrying 0 (attempt 2 of 2): worker 0 exited with code 3" in out
    assert "worker 0 exited with code 3; started worker 1 in its place" in out
    assert sorted(project.successful()) == ["0", "1", "2"] and project.failed() == {}
    assert [(e["status"], e["attempt"], e["worker"]) for e in task_events(project, "0")] == [
        ("retrying", 1, 0), ("succeeded", 2, 1)]


def test_retries_must_be_a_whole_number(project):
    for value in ("-1", "1.5", "'2'"):
        project.write(task="RETRIES = %s\ndef task_method(variables, task_folder, log_file):\n"
                           "    pass\n" % value)
        result = project.run()
        assert result.returncode == 2, console(result)
        assert "task_specification.py:1: RETRIES = %s; it must be a whole number >= 0" \
            % value in result.stderr

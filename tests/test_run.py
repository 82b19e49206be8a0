"""End-to-end runs through the real CLI: the seed's example sweep, success
conditions, output modes, failure handling, hooks, reruns and scheduling.

Every project writes what happens into an "events" file (one short line per
event, appended with one write, so lines of different processes never mix);
the tests read it back to see which process did what, in which order.
"""

import itertools
import json
import os

import pytest

from conftest import TASK_IMPORTS_WAIT_FOR, Project, assert_no_processes_left


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

LOGGER = """
import os as _os

EVENTS = @EVENTS@


def _log(*parts):
    with open(EVENTS, "a") as _stream:
        _stream.write(" ".join(str(part) for part in parts) + "\\n")
"""


def events_path(project):
    return os.path.join(project.dir, "events.txt")


def source(project, text):
    """A project file: the event logger, then ``text``."""
    return (LOGGER + text).replace("@EVENTS@", repr(events_path(project)))


def read_events(project):
    """Events as lists of words, in the order they were written."""
    path = events_path(project)
    if not os.path.exists(path):
        return []
    with open(path) as stream:
        return [line.split() for line in stream.read().splitlines() if line.strip()]


def console(result):
    return result.stdout + result.stderr


def log_or_empty(project, task_id):
    try:
        return project.log(task_id)
    except (IOError, OSError):
        return ""


def resources(workers):
    return "NUM_WORKERS = %d\n" % workers


# --------------------------------------------------------------------------
# the seed's example sweep
# --------------------------------------------------------------------------

SEED_VARIABLES = """

def setup_variable_set(variable_set):
    variable_set.add_variable(
        name="model",
        values=["gpt2", "google-bert/bert-base-uncased", "meta-llama/Llama-3.1-8B"],
        nicknames=["GPT2", "BERT", "Llama3.1"])
    variable_set.add_variable(name="dataset", values=["HappyGoLucky", "FinalEmotions"],
                              interaction="cartesian")
    variable_set.add_variable(name="test_set", values=["dev", "test"],
                              exceptions={"HappyGoLucky": ["test"]})
    variable_set.add_variable(name="seed", values=list(range(0, 9999, 1111)),
                              nicknames=list(range(0, 9, 1)))


class Model(object):
    def __init__(self, name, nickname):
        self.name = name
        self.nickname = nickname
        _log(_os.getpid(), "load", "model", name)

    def __del__(self):
        _log(_os.getpid(), "del", "model", self.name)


def model_to_value(string_value, nickname):
    assert isinstance(string_value, str), repr(string_value)
    _log(_os.getpid(), "convert", "model", string_value, nickname)
    return Model(string_value, nickname)


def dataset_to_value(string_value, nickname):
    assert isinstance(string_value, str), repr(string_value)
    _log(_os.getpid(), "convert", "dataset", string_value, nickname)
    return {"dataset": string_value, "nickname": nickname, "rows": len(string_value)}
"""

SEED_TASK = """
import json


def task_method(variables, task_folder, log_file):
    model, dataset = variables["model"], variables["dataset"]
    test_set, seed = variables["test_set"], variables["seed"]
    _log(_os.getpid(), "task", model.name, dataset["dataset"], test_set, seed)
    with open(_os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"model": [type(model).__name__, model.name, model.nickname],
                   "dataset": dataset,
                   "test_set": [type(test_set).__name__, test_set],
                   "seed": [type(seed).__name__, seed],
                   "names": sorted(variables)}, stream)
    print("evaluated", model.name, dataset["dataset"], test_set, seed)
"""

MODELS = [("gpt2", "GPT2"), ("google-bert/bert-base-uncased", "BERT"),
          ("meta-llama/Llama-3.1-8B", "Llama3.1")]
DATASETS = [("HappyGoLucky", ["test"]), ("FinalEmotions", ["dev", "test"])]
SEEDS = [(1111 * n, str(n)) for n in range(9)]


def seed_example_tasks():
    """(task ID, {name: (value, nickname)}) in generation order."""
    tasks = []
    for model, model_nick in MODELS:
        for dataset, test_sets in DATASETS:
            for test_set in test_sets:
                for seed, seed_nick in SEEDS:
                    task_id = "/".join([model_nick, dataset, test_set, seed_nick])
                    tasks.append((task_id, {"model": (model, model_nick),
                                            "dataset": (dataset, dataset),
                                            "test_set": (test_set, test_set),
                                            "seed": (seed, seed_nick)}))
    return tasks


def run_lengths(sequence):
    return [key for key, _ in itertools.groupby(sequence)]


def check_release_before_load(events, variable):
    """Per process: no converter call for ``variable`` while an old object lives."""
    alive = {}
    for event in events:
        if len(event) < 4 or event[2] != variable:
            continue
        pid, what, name = event[0], event[1], event[3]
        held = alive.setdefault(pid, [])
        if what == "convert":
            assert not held, ("pid %s converted %s %r while %r was still alive (the old "
                              "object must be released first)" % (pid, variable, name, held))
        elif what == "load":
            held.append(name)
        elif what == "del":
            assert name in held, "pid %s released %r that it did not hold" % (pid, name)
            held.remove(name)


class Sweep(object):
    """One run of the seed's example sweep, shared by the tests below."""

    def __init__(self, project, workers):
        self.project, self.workers = project, workers
        project.write(task=source(project, SEED_TASK),
                      variables=source(project, SEED_VARIABLES), resources=resources(workers))
        self.result = project.run()
        assert_no_processes_left(project.dir)
        self.expected = seed_example_tasks()
        self.events = read_events(project)
        self.tasks = [event for event in self.events if event[1] == "task"]
        self.worker_pids = {event[0] for event in self.tasks}

    def converted(self, variable, pid=None):
        """The values converted for ``variable`` (by ``pid``), in order."""
        return [event[3] for event in self.events if event[1] == "convert" and
                event[2] == variable and pid in (None, event[0])]


@pytest.fixture(scope="module")
def seed_sweeps(tmp_path_factory):
    """sweep(workers): the seed sweep run once per worker count for the module."""
    made = {}

    def sweep(workers):
        if workers not in made:
            made[workers] = Sweep(Project(tmp_path_factory.mktemp("seed%d" % workers)), workers)
        return made[workers]
    return sweep


@pytest.fixture(params=[1, 2], ids=["1 worker", "2 workers"])
def sweep(request, seed_sweeps):
    return seed_sweeps(request.param)


@pytest.fixture
def one_worker_sweep(seed_sweeps):
    return seed_sweeps(1)


def test_seed_sweep_has_81_tasks():
    assert len(seed_example_tasks()) == 3 * (1 + 2) * 9 == 81


def test_seed_sweep_succeeds(sweep):
    assert sweep.result.returncode == 0, console(sweep.result)
    assert sweep.project.failed() == {}


def test_seed_sweep_runs_every_task_exactly_once(sweep):
    assert sorted(sweep.project.successful()) == sorted(task_id for task_id, _ in sweep.expected)
    assert len(sweep.tasks) == 81
    ran = sorted("%s %s %s %s" % tuple(event[2:6]) for event in sweep.tasks)
    assert len(set(ran)) == 81


def test_seed_sweep_lists_the_tasks_in_generation_order(sweep):
    entries = sweep.project.all_tasks()
    assert isinstance(entries, list)
    assert [entry["task_id"] for entry in entries] == \
        [task_id for task_id, _ in sweep.expected]


def test_seed_sweep_task_list_entries_have_the_schema(sweep):
    for entry in sweep.project.all_tasks():
        assert set(entry) == {"task_id", "task_folder", "variables"}
        assert list(entry["variables"]) == ["model", "dataset", "test_set", "seed"]
        for stored in entry["variables"].values():
            assert set(stored) == {"value", "nickname"}


def test_seed_sweep_task_list_has_each_tasks_folder(sweep):
    project = sweep.project
    for entry in project.all_tasks():
        folder = os.path.normpath(os.path.join(project.dir, entry["task_folder"]))
        assert folder == os.path.normpath(os.path.join(project.outputs,
                                                       *entry["task_id"].split("/")))


def test_seed_sweep_task_list_keeps_values_with_their_types_and_nicknames(sweep):
    for entry, (task_id, variables) in zip(sweep.project.all_tasks(), sweep.expected):
        for name, (value, nickname) in variables.items():
            stored = entry["variables"][name]
            assert stored["value"] == value and type(stored["value"]) is type(value), \
                (task_id, name, stored)
            assert str(stored["nickname"]) == nickname, (task_id, name, stored)


def test_seed_sweep_folders_nest_by_nickname_leaving_out_exceptions(sweep):
    outputs = sweep.project.outputs
    assert sorted(os.listdir(outputs)) == ["BERT", "GPT2", "Llama3.1"]
    assert sorted(os.listdir(os.path.join(outputs, "GPT2"))) == ["FinalEmotions", "HappyGoLucky"]
    assert os.listdir(os.path.join(outputs, "BERT", "HappyGoLucky")) == ["test"]
    assert sorted(os.listdir(os.path.join(outputs, "Llama3.1", "FinalEmotions"))) == \
        ["dev", "test"]
    assert sorted(os.listdir(os.path.join(outputs, "GPT2", "HappyGoLucky", "test"))) == \
        [str(n) for n in range(9)]


def test_seed_sweep_tasks_get_the_converters_return_values(sweep):
    for task_id, variables in sweep.expected:
        received = json.loads(sweep.project.output(*(task_id.split("/") + ["result.json"])))
        model, model_nick = variables["model"]
        dataset = variables["dataset"][0]
        assert received["model"] == ["Model", model, model_nick]
        assert received["dataset"] == {"dataset": dataset, "nickname": dataset,
                                       "rows": len(dataset)}
        assert received["names"] == ["dataset", "model", "seed", "test_set"]


def test_seed_sweep_tasks_get_unconverted_values_with_their_types(sweep):
    for task_id, variables in sweep.expected:
        received = json.loads(sweep.project.output(*(task_id.split("/") + ["result.json"])))
        assert received["test_set"] == ["str", variables["test_set"][0]]
        assert received["seed"] == ["int", variables["seed"][0]]


def test_seed_sweep_task_output_goes_to_its_log(sweep):
    for task_id, variables in sweep.expected:
        assert "evaluated %s %s %s %s" % (variables["model"][0], variables["dataset"][0],
                                          variables["test_set"][0], variables["seed"][0]) \
            in sweep.project.log(task_id)


def test_seed_sweep_runs_on_at_most_num_workers_processes(sweep):
    assert 1 <= len(sweep.worker_pids) <= sweep.workers


def test_seed_sweep_converters_run_in_the_workers(sweep):
    converting = {event[0] for event in sweep.events if event[1] == "convert"}
    assert converting and converting <= sweep.worker_pids


def test_seed_sweep_converters_run_only_when_the_value_changes_for_that_worker(sweep):
    for pid in sweep.worker_pids:
        mine = [event for event in sweep.tasks if event[0] == pid]
        for position, variable in ((2, "model"), (3, "dataset")):
            converted = sweep.converted(variable, pid)
            assert converted == run_lengths([event[position] for event in mine]), \
                "worker %s converted %s values %r" % (pid, variable, converted)


def test_seed_sweep_releases_the_old_model_before_converting_the_next(sweep):
    check_release_before_load(sweep.events, "model")


def test_seed_sweep_on_one_worker_converts_each_model_once_in_order(one_worker_sweep):
    assert one_worker_sweep.converted("model") == [model for model, _ in MODELS]


def test_seed_sweep_on_one_worker_converts_the_dataset_again_for_each_model(one_worker_sweep):
    assert one_worker_sweep.converted("dataset") == ["HappyGoLucky", "FinalEmotions"] * 3


def test_seed_sweep_on_one_worker_deletes_each_model_before_the_next_loads(one_worker_sweep):
    """... and the last one when the worker leaves."""
    model_events = [event[1:4] for event in one_worker_sweep.events if event[2] == "model"]
    assert model_events == [
        ["convert", "model", "gpt2"], ["load", "model", "gpt2"],
        ["del", "model", "gpt2"],
        ["convert", "model", "google-bert/bert-base-uncased"],
        ["load", "model", "google-bert/bert-base-uncased"],
        ["del", "model", "google-bert/bert-base-uncased"],
        ["convert", "model", "meta-llama/Llama-3.1-8B"],
        ["load", "model", "meta-llama/Llama-3.1-8B"],
        ["del", "model", "meta-llama/Llama-3.1-8B"]]


RETENTION_TASK = """
def task_method(variables, task_folder, log_file):
    _log(_os.getpid(), "task", variables["model"].name, variables["seed"])
"""

RETENTION_VARIABLES = """

class Model(object):
    def __init__(self, name):
        self.name = name
        _log(_os.getpid(), "load", "model", name)

    def __del__(self):
        _log(_os.getpid(), "del", "model", self.name)


def model_to_value(string_value, nickname):
    _log(_os.getpid(), "convert", "model", string_value)
    return Model(string_value)


def setup_variable_set(variable_set):
@ADD@
"""

RETENTION_LAYOUTS = {
    # the converted variable at the top, at the bottom, and alone
    "top": '    variable_set.add_variable(name="model", values=["m1", "m2", "m3"])\n'
           '    variable_set.add_variable(name="seed", values=[1, 2])\n',
    "bottom": '    variable_set.add_variable(name="seed", values=[1, 2])\n'
              '    variable_set.add_variable(name="model", values=["m1", "m2", "m3"])\n',
    "alone": '    variable_set.add_variable(name="model", values=["m1", "m2", "m3"])\n',
}


@pytest.mark.parametrize("layout", sorted(RETENTION_LAYOUTS))
def test_old_value_released_before_next_conversion(project, layout):
    task = RETENTION_TASK
    if layout == "alone":
        task = task.replace('variables["seed"]', '0')
    project.write(task=source(project, task),
                  variables=source(project, RETENTION_VARIABLES.replace(
                      "@ADD@\n", RETENTION_LAYOUTS[layout])),
                  resources=resources(1))
    result = project.run()
    assert result.returncode == 0, console(result)
    events = read_events(project)
    tasks = [event for event in events if event[1] == "task"]
    converted = [event[3] for event in events if event[1] == "convert"]
    assert converted == run_lengths([event[2] for event in tasks])
    check_release_before_load(events, "model")


# --------------------------------------------------------------------------
# SUCCESS_CONDITION
# --------------------------------------------------------------------------

BEHAVIOUR_VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="behaviour",
                              values=["raise", "verify_false", "both", "fine"])
"""

BEHAVIOUR_TASK = """
@SETTING@

def task_method(variables, task_folder, log_file):
    behaviour = variables["behaviour"]
    open(_os.path.join(task_folder, "ran"), "w").close()
    if behaviour in ("raise", "both"):
        raise RuntimeError("boom-" + behaviour)


def verify_task_success(variables, task_folder, log_file):
    open(_os.path.join(task_folder, "verified"), "w").close()
    return variables["behaviour"] not in ("verify_false", "both")
"""

# condition -> (tasks that succeed, whether verify_task_success may be called)
SUCCESS_TABLE = {
    None: ({"fine"}, True),                        # the default: NO_ERROR_AND_VERIFY
    "NO_ERROR_AND_VERIFY": ({"fine"}, True),
    "NO_ERROR_ONLY": ({"verify_false", "fine"}, False),
    "VERIFY_ONLY": ({"raise", "fine"}, True),
    "ALWAYS_SUCCESS": ({"raise", "verify_false", "both", "fine"}, False),
}


@pytest.mark.parametrize("condition", list(SUCCESS_TABLE), ids=lambda c: c or "default")
def test_success_condition(project, condition):
    setting = "" if condition is None else "SUCCESS_CONDITION = %r" % condition
    project.write(task=source(project, BEHAVIOUR_TASK.replace("@SETTING@", setting)),
                  variables=BEHAVIOUR_VARIABLES, resources=resources(2))
    result = project.run()
    everything = {"raise", "verify_false", "both", "fine"}
    succeed, verifies = SUCCESS_TABLE[condition]
    assert sorted(project.successful()) == sorted(succeed)
    failed = project.failed()
    assert set(failed) == everything - succeed
    with open(os.path.join(project.queue, "failed_tasks.txt")) as stream:
        for line in stream.read().splitlines():
            task_id, reason = line.split("\t")
            assert reason.strip(), "failed line %r has no reason" % line
    if condition in (None, "NO_ERROR_AND_VERIFY", "NO_ERROR_ONLY"):
        assert "boom-raise" in failed["raise"]
        assert "boom-both" in failed["both"]
    assert result.returncode == (0 if succeed == everything else 1), console(result)
    for behaviour in everything:
        folder = os.path.join(project.outputs, behaviour)
        assert os.path.exists(os.path.join(folder, "ran"))
        verified = os.path.exists(os.path.join(folder, "verified"))
        if not verifies:
            assert not verified, "verify_task_success was called under %s" % condition
        elif condition == "VERIFY_ONLY" or behaviour in ("fine", "verify_false"):
            assert verified, "verify_task_success was not called for %s" % behaviour
    if "raise" in failed:
        assert "boom-raise" in project.log("raise")   # the traceback is in the log


# --------------------------------------------------------------------------
# OUTPUT_MODE
# --------------------------------------------------------------------------

OUTPUT_TASK = """
import sys
@SETTING@

def task_method(variables, task_folder, log_file):
    x = variables["x"]
    print("py-stdout-%d" % x)
    sys.stderr.write("py-stderr-%d\\n" % x)
    _os.write(1, ("fd1-%d\\n" % x).encode())
    _os.write(2, ("fd2-%d\\n" % x).encode())
"""

OUTPUT_VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2])
"""


@pytest.mark.parametrize("mode", [None, "LOG_FILE_ONLY", "CONSOLE_ONLY", "LOG_FILE_AND_CONSOLE"],
                         ids=lambda m: m or "default")
def test_output_mode(project, mode):
    setting = "" if mode is None else "OUTPUT_MODE = %r" % mode
    project.write(task=source(project, OUTPUT_TASK.replace("@SETTING@", setting)),
                  variables=OUTPUT_VARIABLES, resources=resources(1))
    result = project.run()
    assert result.returncode == 0, console(result)
    assert sorted(project.successful()) == ["1", "2"]
    in_log = mode in (None, "LOG_FILE_ONLY", "LOG_FILE_AND_CONSOLE")
    on_console = mode in ("CONSOLE_ONLY", "LOG_FILE_AND_CONSOLE")
    for x in (1, 2):
        log = log_or_empty(project, str(x))
        for marker in ("py-stdout-%d" % x, "py-stderr-%d" % x, "fd1-%d" % x, "fd2-%d" % x):
            assert (marker in log) == in_log, "%s in the log of %d: %r" % (marker, x, log)
            assert (marker in console(result)) == on_console, \
                "%s on the console: %r" % (marker, console(result))
        if mode == "LOG_FILE_AND_CONSOLE":
            other = "py-stdout-%d" % (3 - x)
            assert other not in log


# --------------------------------------------------------------------------
# FAILURE_HANDLING
# --------------------------------------------------------------------------

FAILING_TASK = """
def task_method(variables, task_folder, log_file):
    _log("ran", variables["x"])
    if variables["x"] == 1:
        raise ValueError("the first task fails")


def after_all_tasks():
    _log("after_all_tasks")
"""

FAILING_VARIABLES = """
@SETTING@


def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3, 4],
                              nicknames=["kaput7", "two", "three", "four"])
"""


@pytest.mark.parametrize("handling", [None, "PRINT_FAILURE_AND_CONTINUE", "SILENT_CONTINUE",
                                      "STOP_EXECUTION"], ids=lambda h: h or "default")
def test_failure_handling(project, handling):
    setting = "" if handling is None else "FAILURE_HANDLING = %r" % handling
    project.write(task=source(project, FAILING_TASK),
                  variables=FAILING_VARIABLES.replace("@SETTING@", setting),
                  resources=resources(1))
    result = project.run()
    assert result.returncode == 1, console(result)
    assert list(project.failed()) == ["kaput7"]
    ran = [event[1] for event in read_events(project) if event[0] == "ran"]
    assert read_events(project)[-1] == ["after_all_tasks"]
    if handling == "STOP_EXECUTION":
        assert ran == ["1"]
        assert project.successful() == []
        for later in ("two", "three", "four"):
            assert not os.path.exists(os.path.join(project.outputs, later, "task.log"))
    else:
        assert sorted(ran) == ["1", "2", "3", "4"]
        assert sorted(project.successful()) == ["four", "three", "two"]
    if handling == "SILENT_CONTINUE":
        assert "kaput7" not in console(result)
        assert "FAILED" not in console(result)
    else:
        assert "FAILED kaput7" in console(result)


# --------------------------------------------------------------------------
# hooks: order, and the process each runs in
# --------------------------------------------------------------------------

HOOK_TASK = """

def before_all_tasks():
    _log("before_all_tasks", _os.getpid())


def after_all_tasks():
    _log("after_all_tasks", _os.getpid())


def before_each_worker(worker_id):
    _log("before_each_worker", _os.getpid(), worker_id, _os.getppid())


def after_each_worker(worker_id):
    _log("after_each_worker", _os.getpid(), worker_id)


def before_each_task(variables, task_folder, log_file):
    _log("before_each_task", _os.getpid(), variables["x"], ",".join(sorted(variables)))
    variables["added"] = "by-before-%d" % variables["x"]
    variables["x"] = variables["x"] * 100


def task_method(variables, task_folder, log_file):
    _log("task_method", _os.getpid(), variables["x"], variables.get("added"),
         _os.path.isdir(task_folder))
    if variables["x"] == @FAIL@:
        raise RuntimeError("hook-test-failure")


def after_each_task(variables, task_folder, log_file):
    _log("after_each_task", _os.getpid(), variables["x"], variables.get("added"))


def verify_task_success(variables, task_folder, log_file):
    _log("verify_task_success", _os.getpid(), variables["x"], variables.get("added"))
    return True
"""

HOOK_VARIABLES = """

def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3, 4])


def on_task_success(variables, task_folder, log_file):
    _log("on_task_success", _os.getpid(), _os.path.basename(task_folder), log_file)


def on_task_failure(variables, task_folder, log_file, reason):
    _log("on_task_failure", _os.getpid(), _os.path.basename(task_folder), log_file,
         "hook-test-failure" in reason)
"""


@pytest.mark.parametrize("failing", [False, True], ids=["all-succeed", "one-fails"])
def test_hook_order_and_processes(project, failing):
    project.write(task=source(project, HOOK_TASK.replace("@FAIL@", "300" if failing else "-1")),
                  variables=source(project, HOOK_VARIABLES), resources=resources(2))
    result = project.run()
    assert result.returncode == (1 if failing else 0), console(result)
    events = read_events(project)
    names = [event[0] for event in events]

    # main process: first and last, even when a task failed
    assert names[0] == "before_all_tasks" and names[-1] == "after_all_tasks", names
    assert names.count("before_all_tasks") == names.count("after_all_tasks") == 1
    main_pid = events[0][1]
    assert events[-1][1] == main_pid

    # workers: once each, in their own process, children of the main process
    starts = [event for event in events if event[0] == "before_each_worker"]
    assert sorted(event[2] for event in starts) == ["0", "1"]
    worker_pids = {event[1] for event in starts}
    assert len(worker_pids) == 2 and main_pid not in worker_pids
    assert all(event[3] == main_pid for event in starts)
    ends = [event for event in events if event[0] == "after_each_worker"]
    assert sorted((event[1], event[2]) for event in ends) == \
        sorted((event[1], event[2]) for event in starts)

    # per worker: before_each_worker, then whole task sequences, then after_each_worker
    seen = []
    for pid in worker_pids:
        mine = [event for event in events if event[1] == pid]
        assert mine[0][0] == "before_each_worker" and mine[-1][0] == "after_each_worker"
        body = mine[1:-1]
        while body:
            before, task, after = body[0], body[1], body[2]
            x = int(before[2])
            assert before[0] == "before_each_task"
            assert before[3] == "x"               # what it got: only the variables
            assert task[0] == "task_method" and after[0] == "after_each_task"
            changed = [str(x * 100), "by-before-%d" % x]
            assert task[2:4] == changed and task[4] == "True"
            assert after[2:] == changed
            body = body[3:]
            if body and body[0][0] == "verify_task_success":
                assert body[0][2:] == changed
                body = body[1:]
            elif not (failing and x == 3):
                raise AssertionError("verify_task_success not called for x=%d" % x)
            seen.append(x)
    assert sorted(seen) == [1, 2, 3, 4]

    # result hooks: main process, after the task's hooks, with the folder and log
    for x in (1, 2, 3, 4):
        fails = failing and x == 3
        hook = "on_task_failure" if fails else "on_task_success"
        found = [i for i, event in enumerate(events) if event[0] == hook and event[2] == str(x)]
        assert len(found) == 1, (hook, x, events)
        event = events[found[0]]
        assert event[1] == main_pid
        assert os.path.samefile(event[3], os.path.join(project.outputs, str(x), "task.log"))
        if fails:
            assert event[4] == "True"   # the reason names the exception
        last_worker_hook = max(i for i, e in enumerate(events)
                               if e[0] in ("after_each_task", "verify_task_success")
                               and e[2] == str(x * 100))
        assert found[0] > last_worker_hook
    if not failing:
        assert "on_task_failure" not in names


# --------------------------------------------------------------------------
# reruns
# --------------------------------------------------------------------------

RERUN_TASK = """

def task_method(variables, task_folder, log_file):
    _log("ran", variables["x"])
    if variables["x"] == 3 and not _os.path.exists(_os.path.join(@DIR@, "fixed")):
        raise RuntimeError("not fixed yet")
"""

RERUN_VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=@VALUES@)
"""


def ran_in(project, before):
    """x values run since the event file had ``before`` lines."""
    return sorted(int(event[1]) for event in read_events(project)[before:] if event[0] == "ran")


def test_reruns(project):
    project.write(task=source(project, RERUN_TASK.replace("@DIR@", repr(project.dir))),
                  variables=RERUN_VARIABLES.replace("@VALUES@", "[1, 2, 3, 4]"),
                  resources=resources(2))
    first = project.run()
    assert first.returncode == 1, console(first)
    assert ran_in(project, 0) == [1, 2, 3, 4]
    assert sorted(project.successful()) == ["1", "2", "4"]
    assert list(project.failed()) == ["3"]

    # a second run retries only the failed task, and says how many succeeded
    mark = len(read_events(project))
    second = project.run()
    assert second.returncode == 1, console(second)
    assert "3 of 4 tasks already succeeded" in console(second)
    assert ran_in(project, mark) == [3]
    assert sorted(project.successful()) == ["1", "2", "4"]
    assert list(project.failed()) == ["3"]

    # fixed: the retry succeeds, and nothing else runs
    open(os.path.join(project.dir, "fixed"), "w").close()
    mark = len(read_events(project))
    third = project.run()
    assert third.returncode == 0, console(third)
    assert ran_in(project, mark) == [3]
    assert sorted(project.successful()) == ["1", "2", "3", "4"]
    assert "3" not in project.failed()

    # all done: nothing runs, exit 0
    mark = len(read_events(project))
    fourth = project.run()
    assert fourth.returncode == 0, console(fourth)
    assert "already succeeded" in console(fourth)
    assert ran_in(project, mark) == []

    # a new value: only the new task runs
    project.write(variables=RERUN_VARIABLES.replace("@VALUES@", "[1, 2, 3, 4, 5]"))
    mark = len(read_events(project))
    fifth = project.run()
    assert fifth.returncode == 0, console(fifth)
    assert "4 of 5 tasks already succeeded" in console(fifth)
    assert ran_in(project, mark) == [5]
    assert sorted(project.successful()) == ["1", "2", "3", "4", "5"]
    assert len(project.all_tasks()) == 5

    # --fresh: everything again, and each task listed once
    mark = len(read_events(project))
    fresh = project.run("--fresh")
    assert fresh.returncode == 0, console(fresh)
    assert ran_in(project, mark) == [1, 2, 3, 4, 5]
    assert sorted(project.successful()) == ["1", "2", "3", "4", "5"]
    assert project.failed() == {}


# --------------------------------------------------------------------------
# retention scheduling, seen from outside
# --------------------------------------------------------------------------

SPREAD_TASK = TASK_IMPORTS_WAIT_FOR + """
import glob


def task_method(variables, task_folder, log_file):
    # Wait (bounded) until both workers hold a task, so that one worker
    # cannot finish everything before the other asks for work.
    open(_os.path.join(@DIR@, "busy-%d" % _os.getpid()), "w").close()
    wait_for(lambda: len(glob.glob(_os.path.join(@DIR@, "busy-*"))) >= 2, timeout=120,
             message="both workers to hold a task")
    _log(_os.getpid(), variables["model"], variables["seed"])
"""

SPREAD_VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["alpha", "beta"])
    variable_set.add_variable(name="seed", values=[1, 2, 3])
"""


def test_fresh_workers_start_on_different_top_level_values(project):
    project.write(task=source(project, SPREAD_TASK.replace("@DIR@", repr(project.dir))),
                  variables=SPREAD_VARIABLES, resources=resources(2))
    result = project.run()
    assert result.returncode == 0, console(result)
    events = read_events(project)
    assert len(events) == 6
    first = {}
    for pid, model, _ in events:
        first.setdefault(pid, model)
    assert sorted(first.values()) == ["alpha", "beta"], events
    # and the models are loaded within the bound, P + W - 1 = 3 (a worker
    # whose branch runs out may join the other's through a task queued
    # ahead, and be handed back and forth once as queued tasks are taken
    # back: which happens depends on the timing of the first tasks)
    loads = sum(len(run_lengths([model for p, model, _ in events if p == pid]))
                for pid in first)
    assert loads <= 3, events


WAIT_TASK = TASK_IMPORTS_WAIT_FOR + """
import time

DONE = _os.path.join(@DIR@, "big-done")


def task_method(variables, task_folder, log_file):
    _log(_os.getpid(), "task", variables["model"], variables["item"])
    if variables["model"] == "big":
        time.sleep(0.05)
        with open(DONE, "a") as stream:
            stream.write("x")
        return
    # "small" ends only once "big" has measured tasks (bounded wait), so the
    # scheduler knows what is left there when "small" runs out
    wait_for(lambda: _os.path.exists(DONE) and _os.path.getsize(DONE) >= 8, timeout=120,
             message="8 tasks of 'big' to end")
"""

WAIT_VARIABLES = """
import time


def model_to_value(string_value, nickname):
    _log(_os.getpid(), "load", string_value)
    time.sleep(1.5)
    return string_value


def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["small", "big"])
    variable_set.add_variable(name="item", values=list(range(14)),
                              exceptions={"small": [0, 1]})
"""


def test_a_worker_does_not_load_a_model_for_the_last_few_tasks_of_a_busy_one(project):
    # 3 workers, 2 models of 1.5 s loads: "small" has 2 tasks, "big" 14, so
    # "big" gets two workers.  When "small" is done, "big" has at most 4
    # tasks of 0.05 s not started, for two workers: loading it a third time
    # would not pay, and that worker waits for the end instead.
    project.write(task=source(project, WAIT_TASK.replace("@DIR@", repr(project.dir))),
                  variables=source(project, WAIT_VARIABLES), resources=resources(3))
    result = project.run()
    assert result.returncode == 0, console(result)
    assert len(project.successful()) == 16
    events = read_events(project)
    loads = [(pid, model) for pid, kind, model, *_ in events if kind == "load"]
    assert len(loads) == len(set(loads)), loads      # nobody loads a model twice
    small = [pid for pid, model in loads if model == "small"]
    assert len(small) == 1, loads
    assert (small[0], "big") not in loads, loads
    ran = [(pid, model) for pid, kind, model, *_ in events if kind == "task"]
    assert ran.count((small[0], "small")) == 2 and (small[0], "big") not in ran

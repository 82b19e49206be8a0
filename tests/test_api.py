"""Sweeps declared in Python: Threadward(directory, task=..., variables=...,
**settings and hooks), run by real scripts in a subprocess with real workers.

The scripts live in tmp_path (with a small module, mylib.py, beside them) and
import this checkout's threadward through PYTHONPATH. Their functions leave
files behind (loads.txt, workers.txt, seen.json in each task folder), which
the tests read to see which process did what.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

import threadward
from conftest import ROOT, TASK_IMPORTS_WAIT_FOR, assert_no_processes_left, needs_gputil, \
    read_until, wait_for


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

MYLIB = """
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _append(name, line):
    with open(os.path.join(HERE, name), "a") as stream:
        stream.write(line + "\\n")


def load_model(string_value, nickname):
    _append("loads.txt", "%s %d" % (string_value, os.getpid()))
    return {"name": string_value, "loaded_by": os.getpid()}


def setup(worker_id):
    _append("workers.txt", "%d %d %s" % (worker_id, os.getpid(),
                                         os.environ.get("CUDA_VISIBLE_DEVICES")))


def train(variables, task_folder, log_file):
    with open(os.path.join(task_folder, "seen.json"), "w") as stream:
        json.dump({"model": variables["model"], "seed": variables["seed"],
                   "pid": os.getpid(), "cwd": os.getcwd(),
                   "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}, stream)
"""


class Scripts:
    """A folder of scripts (and mylib.py) run as `python NAME` in that folder."""

    def __init__(self, directory):
        self.dir = str(directory)
        self.write("mylib.py", MYLIB)

    def write(self, name, text):
        with open(self.path(name), "w") as stream:
            stream.write(textwrap.dedent(text))

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def env(self, extra=None):
        env = dict(os.environ)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        # This checkout's threadward, not an installed one.
        env["PYTHONPATH"] = os.pathsep.join(
            path for path in (ROOT, env.get("PYTHONPATH")) if path)
        env.update(extra or {})
        return env

    def run(self, name="sweep.py", input=None, env=None, timeout=120):
        return subprocess.run([sys.executable, name], cwd=self.dir, input=input or "",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout, env=self.env(env))

    def start(self, name="sweep.py", env=None):
        """In a session of its own, so that a SIGINT to its group reaches it alone."""
        return subprocess.Popen([sys.executable, name], cwd=self.dir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, env=self.env(env),
                                start_new_session=True)

    def lines(self, *parts):
        if not os.path.exists(self.path(*parts)):
            return []
        with open(self.path(*parts)) as stream:
            return stream.read().splitlines()

    def queue(self, name, runs="runs"):
        return self.lines(runs, "threadward", "task_queue", name)

    def failed(self, runs="runs"):
        return dict((line.split("\t", 1) + [""])[:2] for line in self.queue("failed_tasks.txt",
                                                                              runs))

    def output(self, runs, task_id, name):
        with open(self.path(runs, "threadward", "task_outputs", task_id, name)) as stream:
            return stream.read()


@pytest.fixture
def scripts(tmp_path):
    made = Scripts(tmp_path)
    yield made
    assert_no_processes_left(made.dir)


def console(result):
    return result.stdout + result.stderr


# In-process tests pass functions of this module: workers import it by name.
def module_task(variables, task_folder, log_file):
    print("x is", variables["x"])


def module_hook(worker_id):
    pass


def variable_set():
    variables = threadward.VariableSet()
    variables.add_variable(name="x", values=[1, 2])
    return variables


# --------------------------------------------------------------------------
# the issue's example
# --------------------------------------------------------------------------

EXAMPLE = """
import threadward
import mylib

variables = threadward.VariableSet()
variables.add_variable(name="model", values=["gpt2", "bert"], to_value=mylib.load_model)
variables.add_variable(name="seed", values=[0, 1, 2])
if __name__ == "__main__":
    code = threadward.Threadward(directory="runs/exp1", task=mylib.train, variables=variables,
                                 num_workers=2, num_gpus_per_worker=1,
                                 before_each_worker=mylib.setup@RETRIES@).run()
    raise SystemExit(code)
"""


@needs_gputil
def test_the_example_of_the_issue_runs_on_two_workers_with_a_gpu_each(scripts, fake_gpus):
    # retries= is a keyword once RETRIES is a setting (every setting is one).
    retries = ", retries=1" if "RETRIES" in threadward.SETTINGS["task_specification.py"] else ""
    scripts.write("sweep.py", EXAMPLE.replace("@RETRIES@", retries))
    result = scripts.run()
    assert result.returncode == 0, console(result)
    assert "running 6 tasks on 2 workers, GPUs 0,1" in result.stdout
    task_ids = ["%s/%d" % (model, seed) for model in ("gpt2", "bert") for seed in (0, 1, 2)]
    assert sorted(scripts.queue("successful_tasks.txt", "runs/exp1")) == sorted(task_ids)
    workers = [line.split() for line in scripts.lines("workers.txt")]
    assert sorted(worker_id for worker_id, _, _ in workers) == ["0", "1"]
    gpu_of = {int(pid): gpus for _, pid, gpus in workers}
    assert sorted(gpu_of.values()) == ["0", "1"]
    for task_id in task_ids:
        seen = json.loads(scripts.output("runs/exp1", task_id, "seen.json"))
        model, seed = task_id.split("/")
        # the converter's object, made in the worker that ran the task
        assert seen["model"] == {"name": model, "loaded_by": seen["pid"]}
        assert seen["seed"] == int(seed)
        assert seen["gpus"] == gpu_of[seen["pid"]]
        assert seen["cwd"] == scripts.path("runs", "exp1")
    # Each worker converted a model once and kept it for that model's tasks.
    loads = scripts.lines("loads.txt")
    assert len(loads) == len(set(loads))
    assert {line.split()[0] for line in loads} == {"gpt2", "bert"}
    assert {int(line.split()[1]) for line in loads} <= set(gpu_of)


def test_the_readme_example_runs_as_written(scripts):
    with open(os.path.join(ROOT, "README.md")) as stream:
        readme = stream.read()
    section = readme[readme.index("## From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scripts.write("sweep.py", code)
    result = scripts.run()
    assert result.returncode == 0, console(result)
    assert len(scripts.queue("successful_tasks.txt", "runs/exp1")) == 6
    assert scripts.output("runs/exp1", "bert/2", "task.log") == "bert 2\n"


# --------------------------------------------------------------------------
# settings and hooks as keywords
# --------------------------------------------------------------------------

STOPPING = """
import threadward


def task(variables, task_folder, log_file):
    if variables["x"] == 1:
        raise ValueError("x is 1")


variables = threadward.VariableSet()
variables.add_variable(name="x", values=[0, 1, 2, 3])
variables.add_variable(name="y", values=["a"])
if __name__ == "__main__":
    raise SystemExit(threadward.Threadward(
        directory="runs", task=task, variables=variables, num_workers=1,
        failure_handling="STOP_EXECUTION", task_folder_location="VARIABLE_UNDERSCORE").run())
"""


def test_num_workers_failure_handling_and_task_folder_location(scripts):
    scripts.write("sweep.py", STOPPING)
    result = scripts.run()
    assert result.returncode == 1, console(result)
    assert "running 4 tasks on 1 worker" in result.stdout
    assert scripts.queue("successful_tasks.txt") == ["0_a"]
    assert scripts.failed() == {"1_a": "ValueError: x is 1"}
    assert "2 not run" in result.stdout   # STOP_EXECUTION: nothing after the failure
    assert os.path.isdir(scripts.path("runs", "threadward", "task_outputs", "0_a"))


VERIFYING = """
import threadward


def task(variables, task_folder, log_file):
    print("task says", variables["x"])


def verify(variables, task_folder, log_file):
    return variables["x"] != 2


variables = threadward.VariableSet()
variables.add_variable(name="x", values=[0, 1, 2])
if __name__ == "__main__":
    raise SystemExit(threadward.Threadward(
        directory="runs", task=task, variables=variables, num_workers=2,
        verify_task_success=verify, output_mode="LOG_FILE_AND_CONSOLE",
        failure_handling="SILENT_CONTINUE"@CONDITION@).run())
"""


@pytest.mark.parametrize("condition", [None, "NO_ERROR_ONLY"])
def test_a_task_hook_output_mode_and_success_condition(scripts, condition):
    scripts.write("sweep.py", VERIFYING.replace(
        "@CONDITION@", ", success_condition=%r" % condition if condition else ""))
    result = scripts.run()
    if condition is None:   # NO_ERROR_AND_VERIFY: the hook, imported by the worker, is asked
        assert result.returncode == 1, console(result)
        assert scripts.failed() == {"2": "verify_task_success returned False"}
        assert "FAILED" not in result.stdout   # SILENT_CONTINUE
    else:
        assert result.returncode == 0, console(result)
        assert sorted(scripts.queue("successful_tasks.txt")) == ["0", "1", "2"]
    for x in range(3):   # both the log and the console (threadward's stderr)
        assert scripts.output("runs", str(x), "task.log") == "task says %d\n" % x
        assert "task says %d\n" % x in result.stderr


def test_every_setting_of_the_three_files_is_a_keyword_of_its_name_in_lower_case():
    keywords = {name.lower(): ("value of", name)
                for names in threadward.SETTINGS.values() for name in names}
    keywords.update((hook, module_hook) for hook in threadward.MAIN_HOOKS +
                    threadward.WORKER_HOOKS + threadward.TASK_HOOKS + threadward.RESULT_HOOKS)
    sweep = threadward._Sweep(module_task, variable_set(), keywords)
    task, variables, constraints = sweep.modules()
    modules = {"task_specification.py": task, "variable_iteration.py": variables,
               "resource_constraints.py": constraints}
    for filename, names in threadward.SETTINGS.items():
        for name in names:
            assert getattr(modules[filename], name) == ("value of", name)
    assert task.task_method is module_task
    for hook in threadward.MAIN_HOOKS + threadward.WORKER_HOOKS + threadward.TASK_HOOKS:
        assert getattr(task, hook) is module_hook
    for hook in threadward.RESULT_HOOKS:
        assert getattr(variables, hook) is module_hook


def test_main_process_hooks_are_called_as_given_even_closures(tmp_path):
    seen = []
    out = io.StringIO()
    code = threadward.Threadward(
        str(tmp_path / "runs"), task=module_task, variables=variable_set(), num_workers=1,
        before_all_tasks=lambda: seen.append("before"),
        on_task_success=lambda variables, folder, log: seen.append(variables["x"]),
        after_all_tasks=lambda: seen.append("after"), out=out).run()
    assert code == 0, out.getvalue()
    assert seen == ["before", 1, 2, "after"]
    with open(str(tmp_path / "runs" / "threadward" / "task_outputs" / "2" / "task.log")) as log:
        assert log.read() == "x is 2\n"
    assert_no_processes_left(str(tmp_path / "runs"))


def test_a_bad_setting_value_names_the_keyword_at_the_callers_line(tmp_path):
    with pytest.raises(threadward.ConfigError) as caught:
        threadward.Threadward(str(tmp_path / "runs"), task=module_task,
                              variables=variable_set(), failure_handling="KEEP_GOING")
    message = str(caught.value)
    assert re.match(r"\S*test_api\.py:\d+ \(the keyword failure_handling=\): ", message)
    assert "STOP_EXECUTION" in message
    assert not (tmp_path / "runs").exists()


def test_an_unknown_keyword_is_an_error_naming_the_valid_ones(tmp_path):
    with pytest.raises(threadward.ConfigError) as caught:
        threadward.Threadward(str(tmp_path / "runs"), task=module_task,
                              variables=variable_set(), num_worker=2)
    message = str(caught.value)
    assert "no keyword num_worker= (did you mean num_workers=?)" in message
    for keyword in ("num_workers", "failure_handling", "before_each_worker", "on_task_success",
                    "task", "variables", "fresh"):
        assert re.search(r"\b%s\b" % keyword, message)
    assert not (tmp_path / "runs").exists()


def test_settings_without_a_task_and_variables_are_an_error(tmp_path):
    with pytest.raises(threadward.ConfigError, match="needs both task="):
        threadward.Threadward(str(tmp_path), num_workers=2)
    with pytest.raises(threadward.ConfigError, match="needs both task="):
        threadward.Threadward(str(tmp_path), task=module_task)
    with pytest.raises(threadward.ConfigError, match="VariableSet"):
        threadward.Threadward(str(tmp_path), task=module_task, variables=[1, 2])


# --------------------------------------------------------------------------
# what workers can import, and what they cannot
# --------------------------------------------------------------------------

def test_a_lambda_task_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(threadward.ConfigError) as caught:
        threadward.Threadward(str(tmp_path / "runs"), task=lambda variables, folder, log: None,
                              variables=variable_set())
    message = str(caught.value)
    assert re.match(r"\S*test_api\.py:\d+: task is a lambda", message)
    assert "top level of a module" in message
    assert not (tmp_path / "runs").exists()


def test_a_nested_function_is_refused_before_anything_is_written(tmp_path):
    def setup(worker_id):
        pass
    with pytest.raises(threadward.ConfigError) as caught:
        threadward.Threadward(str(tmp_path / "runs"), task=module_task,
                              variables=variable_set(), before_each_worker=setup)
    assert "before_each_worker is setup, a function defined inside " \
           "test_a_nested_function_is_refused_before_anything_is_written()" in str(caught.value)
    assert not (tmp_path / "runs").exists()


def test_a_lambda_converter_is_refused_where_it_is_added():
    with pytest.raises(threadward.ConfigError, match=r"to_value of variable 'x' is a lambda"):
        threadward.VariableSet().add_variable(name="x", values=[1], to_value=lambda s, n: s)


def test_a_function_typed_into_a_notebook_is_refused(tmp_path):
    cell = {"__name__": "__main__"}   # what a notebook's or the REPL's functions look like
    exec(compile("def train(variables, task_folder, log_file):\n    pass\n",
                 "<ipython-input-3-1f2e>", "exec"), cell)
    with pytest.raises(threadward.ConfigError) as caught:
        threadward.Threadward(str(tmp_path / "runs"), task=cell["train"],
                              variables=variable_set())
    assert "defined in a notebook or typed into the interpreter" in str(caught.value)
    assert "move it into a module" in str(caught.value)
    assert not (tmp_path / "runs").exists()


SCRIPT_FUNCTIONS = """
import os
import threadward

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "imports.txt"), "a") as stream:   # every run of this code
    stream.write("%s %d\\n" % (__name__, os.getpid()))


def double(string_value, nickname):
    return int(string_value) * 2


def task(variables, task_folder, log_file):
    with open(os.path.join(task_folder, "x.txt"), "w") as stream:
        stream.write(str(variables["x"]))


variables = threadward.VariableSet()
variables.add_variable(name="x", values=[1, 2, 3], to_value=double)

if __name__ == "__main__":
    with open(os.path.join(HERE, "runs.txt"), "a") as stream:
        stream.write("run %d\\n" % os.getpid())
    raise SystemExit(threadward.Threadward(directory="runs", task=task, variables=variables,
                                           num_workers=2).run())
"""


def test_functions_of_the_running_script_are_imported_by_path_as_spawn_does(scripts):
    scripts.write("sweep.py", SCRIPT_FUNCTIONS)
    # stdin is no terminal: a sweep from code has no console, so "quit" is not read
    result = scripts.run(input="quit\n")
    assert result.returncode == 0, console(result)
    assert [scripts.output("runs", str(x), "x.txt") for x in (1, 2, 3)] == ["2", "4", "6"]
    main_pid = int(scripts.lines("runs.txt")[0].split()[1])
    assert len(scripts.lines("runs.txt")) == 1   # the __main__ block ran in the main process only
    imports = sorted(line.split() for line in scripts.lines("imports.txt"))
    assert imports[0] == ["__main__", str(main_pid)]
    assert [name for name, _ in imports[1:]] == ["__mp_main__", "__mp_main__"]   # each worker


UNGUARDED = """
import threadward


def task(variables, task_folder, log_file):
    pass


variables = threadward.VariableSet()
variables.add_variable(name="x", values=[1, 2])
threadward.Threadward(directory="runs", task=task, variables=variables).run()
"""


def test_a_script_that_would_run_its_sweep_in_every_worker_is_refused(scripts):
    scripts.write("sweep.py", UNGUARDED)
    result = scripts.run()
    assert result.returncode == 1
    assert 'sweep.py:11: workers import this script' in result.stderr
    assert 'put it under `if __name__ == "__main__":`' in result.stderr
    assert not os.path.exists(scripts.path("runs"))


# --------------------------------------------------------------------------
# converters in project files
# --------------------------------------------------------------------------

def test_to_value_works_in_a_project_file_too(project):
    project.write(variables="""
        def ten_times(string_value, nickname):
            return int(string_value) * 10


        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2, 3], to_value=ten_times)
        """, task="""
        import os


        def task_method(variables, task_folder, log_file):
            with open(os.path.join(task_folder, "x.txt"), "w") as stream:
                stream.write(str(variables["x"]))
        """)
    result = project.run()
    assert result.returncode == 0, console(result)
    assert [project.output(str(x), "x.txt") for x in (1, 2, 3)] == ["10", "20", "30"]


def test_to_value_and_a_file_converter_for_one_variable_is_an_error(project):
    project.write(variables="""
        def x_to_value(string_value, nickname):
            return int(string_value) * 10


        def other(string_value, nickname):
            return 0


        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2], to_value=other)
        """)
    result = project.run()
    assert result.returncode == 2, console(result)
    assert "variable_iteration.py:2: variable 'x' has two converters: to_value= in its " \
           "add_variable and x_to_value here; keep one of them" in result.stderr
    assert not os.path.exists(os.path.join(project.queue, "all_tasks.json"))


# --------------------------------------------------------------------------
# Ctrl-C (a notebook's interrupt)
# --------------------------------------------------------------------------

GATED = TASK_IMPORTS_WAIT_FOR + """
import os
import signal
import threadward

HERE = os.path.dirname(os.path.abspath(__file__))


def task(variables, task_folder, log_file):
    open(os.path.join(HERE, "started", str(variables["x"])), "w").close()
    wait_for(lambda: os.path.exists(os.path.join(HERE, "gate")), timeout=120)


def python_handles_sigint():
    # As a library called from a hook may do: Ctrl-C raises KeyboardInterrupt again.
    signal.signal(signal.SIGINT, signal.default_int_handler)


variables = threadward.VariableSet()
variables.add_variable(name="x", values=[0, 1, 2, 3, 4])
if __name__ == "__main__":
    os.makedirs(os.path.join(HERE, "started"))
    hooks = {"before_all_tasks": python_handles_sigint} if os.environ.get("DEFAULT_SIGINT") \\
        else {}
    raise SystemExit(threadward.Threadward(directory="runs", task=task, variables=variables,
                                           num_workers=2, **hooks).run())
"""

HANDLERS = pytest.mark.parametrize("handler", ["threadward's", "KeyboardInterrupt"])


def start_gated(scripts, handler):
    scripts.write("sweep.py", GATED)
    process = scripts.start(env={"DEFAULT_SIGINT": "1"} if handler == "KeyboardInterrupt"
                            else None)
    wait_for(lambda: len(os.listdir(scripts.path("started"))) == 2
             if os.path.isdir(scripts.path("started")) else False)
    return process, sorted(os.listdir(scripts.path("started")))


def finish(process):
    try:
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return out, err


@HANDLERS
def test_a_first_ctrl_c_hands_out_no_new_task_and_lets_running_ones_finish(scripts, handler):
    process, running = start_gated(scripts, handler)
    os.killpg(process.pid, signal.SIGINT)   # the script's group only: workers have their own
    seen = read_until(process.stdout, "press Ctrl-C again")
    open(scripts.path("gate"), "w").close()
    out, err = finish(process)
    assert process.returncode == 1, seen + out + err
    assert sorted(scripts.queue("successful_tasks.txt")) == running
    assert scripts.failed() == {}
    assert sorted(os.listdir(scripts.path("started"))) == running   # no task started after
    assert "3 not run" in out


@HANDLERS
def test_a_second_ctrl_c_ends_running_tasks_as_interrupted(scripts, handler):
    process, running = start_gated(scripts, handler)
    os.killpg(process.pid, signal.SIGINT)
    seen = read_until(process.stdout, "press Ctrl-C again")
    os.killpg(process.pid, signal.SIGINT)
    out, err = finish(process)
    assert process.returncode == 1, seen + out + err
    assert "second Ctrl-C" in out
    assert scripts.queue("successful_tasks.txt") == []
    assert scripts.failed() == {x: "interrupted" for x in running}
    assert "Traceback" not in err

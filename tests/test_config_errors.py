"""Configuration mistakes through the real CLI: exit code 2, the user's file and
line on stderr, and nothing run or changed."""

import os
import re
import textwrap

import pytest

# A task file whose hooks leave marker files, so a test can tell if anything ran.
GOOD_TASK = """\
import os
MARKERS = {markers!r}

def _mark(name):
    open(os.path.join(MARKERS, name + "-" + str(os.getpid())), "w").close()

def before_all_tasks():
    _mark("before_all_tasks")

def before_each_worker(worker_id):
    _mark("before_each_worker")

def task_method(variables, task_folder, log_file):
    _mark("task_method")
"""
GOOD_VARIABLES = """\
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3])
"""
GOOD_RESOURCES = """\
NUM_WORKERS = 2
"""

PREVIOUS = {
    "successful_tasks.txt": b"1\nold/task\n",
    "failed_tasks.txt": b"2\tboom\n",
    "all_tasks.json": b"[\n]\n",
}


@pytest.fixture
def setup(project):
    """The project with marker hooks and earlier results in place."""
    markers = os.path.join(project.dir, "markers")
    os.makedirs(markers)
    project.markers = markers
    project.good_task = GOOD_TASK.format(markers=markers)
    project.write(task=project.good_task, variables=GOOD_VARIABLES, resources=GOOD_RESOURCES)
    for name, data in PREVIOUS.items():
        with open(os.path.join(project.queue, name), "wb") as stream:
            stream.write(data)
    return project


def line_of(text, marker):
    """1-based line of the first line of (dedented) text containing marker."""
    for number, line in enumerate(textwrap.dedent(text).split("\n"), 1):
        if marker in line:
            return number
    raise AssertionError("marker %r not in text" % marker)


def queue_snapshot(project):
    """The queue files' contents; run.lock, empty whenever no run holds it,
    is the lock's own file (a run that finds a mistake in the variables has
    taken it and let it go)."""
    found = {}
    for name in sorted(os.listdir(project.queue)):
        if name == "run.lock":
            assert os.path.getsize(os.path.join(project.queue, name)) == 0
            continue
        with open(os.path.join(project.queue, name), "rb") as stream:
            found[name] = stream.read()
    return found


def expect_config_error(project, filename, line=None, needles=()):
    """Run, and check exit 2, the file (and line) on stderr, nothing run or changed."""
    before = queue_snapshot(project)
    result = project.run(timeout=60)
    stderr = result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, stderr)
    if line is None:
        assert filename in stderr, stderr
    else:
        assert re.search(r"%s:%d\b" % (re.escape(filename), line), stderr), \
            "expected %s:%d in %r" % (filename, line, stderr)
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    # a clean message, not a crash of threadward itself
    assert "threadward.py" not in stderr, stderr
    assert queue_snapshot(project) == before
    assert queue_snapshot(project)["successful_tasks.txt"] == \
        PREVIOUS["successful_tasks.txt"]
    assert not os.path.exists(project.outputs)
    assert os.listdir(project.markers) == []
    return result


# -- files that do not load ----------------------------------------------------

SYNTAX_ERRORS = {
    "task_specification.py": ("task", """\
        def task_method(variables, task_folder, log_file):
            pass

        def after_each_task(variables, task_folder, log_file)   # HERE (missing colon)
            pass
        """),
    "variable_iteration.py": ("variables", """\
        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2, 3])
        FAILURE_HANDLING = "STOP_EXECUTION" "  # HERE
        """),
    "resource_constraints.py": ("resources", """\
        # resources
        NUM_WORKERS = = 2  # HERE
        """),
}


@pytest.mark.parametrize("filename", sorted(SYNTAX_ERRORS))
def test_syntax_error(setup, filename):
    which, text = SYNTAX_ERRORS[filename]
    setup.write(**{which: text})
    expect_config_error(setup, filename, line_of(text, "HERE"))


IMPORT_ERRORS = {
    "task_specification.py": ("task", """\
        import os

        def task_method(variables, task_folder, log_file):
            pass

        raise RuntimeError("broken at import")  # HERE
        """, "broken at import"),
    "variable_iteration.py": ("variables", """\
        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2, 3])

        LOOKUP = {"a": 1}
        VALUE = LOOKUP["missing_key"]  # HERE
        """, "missing_key"),
    "resource_constraints.py": ("resources", """\
        import no_such_module_for_threadward_tests  # HERE
        NUM_WORKERS = 1
        """, "no_such_module_for_threadward_tests"),
}


@pytest.mark.parametrize("filename", sorted(IMPORT_ERRORS))
def test_exception_at_import(setup, filename):
    which, text, needle = IMPORT_ERRORS[filename]
    setup.write(**{which: text})
    expect_config_error(setup, filename, line_of(text, "HERE"), [needle])


def test_exception_in_a_function_called_at_import_reports_the_users_line(setup):
    text = """\
        def helper():
            return 1 / 0  # HERE

        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2, 3])

        VALUE = helper()
        """
    setup.write(variables=text)
    expect_config_error(setup, "variable_iteration.py", line_of(text, "HERE"),
                        ["ZeroDivisionError"])


def test_missing_task_method(setup):
    setup.write(task="""\
        def before_all_tasks():
            pass

        def taskmethod(variables, task_folder, log_file):
            pass
        """)
    expect_config_error(setup, "task_specification.py", needles=["task_method"])


def test_task_method_that_is_not_a_function(setup):
    text = "task_method = 'run'  # HERE\n"
    setup.write(task=text)
    expect_config_error(setup, "task_specification.py", needles=["task_method"])


def test_missing_setup_variable_set(setup):
    setup.write(variables="""\
        def setup_variables(variable_set):
            variable_set.add_variable(name="x", values=[1, 2, 3])
        """)
    expect_config_error(setup, "variable_iteration.py", needles=["setup_variable_set"])


def test_setup_variable_set_adds_nothing(setup):
    setup.write(variables="""\
        def setup_variable_set(variable_set):
            pass
        """)
    expect_config_error(setup, "variable_iteration.py", needles=["setup_variable_set"])


def test_setup_variable_set_raising_reports_the_users_line(setup):
    text = """\
        MODELS = {"gpt2": "GPT2"}

        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2, 3])
            names = MODELS["bert"]  # HERE
        """
    setup.write(variables=text)
    expect_config_error(setup, "variable_iteration.py", line_of(text, "HERE"), ["bert"])


# -- settings ------------------------------------------------------------------

CHOICES = [
    ("task", "task_specification.py", "SUCCESS_CONDITION",
     ["NO_ERROR_AND_VERIFY", "NO_ERROR_ONLY", "VERIFY_ONLY", "ALWAYS_SUCCESS"]),
    ("task", "task_specification.py", "OUTPUT_MODE",
     ["LOG_FILE_ONLY", "CONSOLE_ONLY", "LOG_FILE_AND_CONSOLE"]),
    ("variables", "variable_iteration.py", "FAILURE_HANDLING",
     ["PRINT_FAILURE_AND_CONTINUE", "SILENT_CONTINUE", "STOP_EXECUTION"]),
    ("variables", "variable_iteration.py", "TASK_FOLDER_LOCATION",
     ["VARIABLE_SUBFOLDER", "VARIABLE_UNDERSCORE"]),
]


@pytest.mark.parametrize("which, filename, setting, allowed", CHOICES,
                         ids=[c[2] for c in CHOICES])
@pytest.mark.parametrize("bad", ["SOMETIMES", "no_error_only", 1])
def test_unknown_setting_value_lists_the_allowed_ones(setup, which, filename, setting,
                                                      allowed, bad):
    base = setup.good_task if which == "task" else GOOD_VARIABLES
    text = "# settings\n%s = %r  # HERE\n\n%s" % (setting, bad, base)
    setup.write(**{which: text})
    expect_config_error(setup, filename, line_of(text, "HERE"), [setting] + allowed)


@pytest.mark.parametrize("bad", ["0", "-1", "'2'", "True", "1.5", "None", "[2]"])
def test_bad_num_workers(setup, bad):
    text = "# resources\n\nNUM_WORKERS = %s  # HERE\n" % bad
    setup.write(resources=text)
    expect_config_error(setup, "resource_constraints.py", line_of(text, "HERE"),
                        ["NUM_WORKERS"])


@pytest.mark.parametrize("bad", ["1.5", "0.3", "0.4", "2.5", "-1", "'1'", "True"])
def test_bad_num_gpus_per_worker(setup, bad):
    text = "NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = %s  # HERE\n" % bad
    setup.write(resources=text)
    expect_config_error(setup, "resource_constraints.py", line_of(text, "HERE"),
                        ["NUM_GPUS_PER_WORKER"])


@pytest.mark.parametrize("include, avoid", [
    ('["0", "1"]', '["1"]'),
    ("[0, 1, 2]", '["2", "3"]'),
    ('["3"]', "[3]"),
])
def test_include_and_avoid_overlap(setup, include, avoid):
    text = "NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\nINCLUDE_GPUS = %s\nAVOID_GPUS = %s\n" \
        % (include, avoid)
    setup.write(resources=text)
    expect_config_error(setup, "resource_constraints.py",
                        needles=["INCLUDE_GPUS", "AVOID_GPUS"])


def test_bad_task_timeout(setup):
    text = "TASK_TIMEOUT = '10'  # HERE\n\n" + setup.good_task
    setup.write(task=text)
    expect_config_error(setup, "task_specification.py", line_of(text, "HERE"),
                        ["TASK_TIMEOUT"])


# -- the variable set ----------------------------------------------------------

BAD_CALLS = [
    ("nickname count", 'variable_set.add_variable(name="seed", values=[1, 2, 3], '
                       'nicknames=["a", "b"])'),
    ("unknown exception key", 'variable_set.add_variable(name="seed", values=[1, 2], '
                              'exceptions={"nope": [1]})'),
    ("listed value missing", 'variable_set.add_variable(name="seed", values=[1, 2], '
                             'exceptions={"m1": [7]})'),
    ("zip length", 'variable_set.add_variable(name="seed", values=[1, 2, 3], '
                   'interaction="zip")'),
    ("bad interaction", 'variable_set.add_variable(name="seed", values=[1, 2], '
                        'interaction="product")'),
    ("empty values", 'variable_set.add_variable(name="seed", values=[])'),
    ("values not a list", 'variable_set.add_variable(name="seed", values="12")'),
    ("duplicate name", 'variable_set.add_variable(name="model", values=[1])'),
    ("bad name", 'variable_set.add_variable(name="my seed", values=[1])'),
    ("shared folder", 'variable_set.add_variable(name="seed", values=["a/b", "a_b", "c"],'
                      ' nicknames=["s", "s", "t"])'),
]


@pytest.mark.parametrize("call", [c[1] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_add_variable_call_reports_the_line_of_the_call(setup, call):
    text = """\
        FAILURE_HANDLING = "PRINT_FAILURE_AND_CONTINUE"


        def setup_variable_set(variable_set):
            variable_set.add_variable(name="model", values=["m1", "m2"])
            %s  # HERE
            variable_set.add_variable(name="last", values=[0])
        """ % call
    setup.write(variables=text)
    name = re.search(r'name="([^"]*)"', call).group(1)
    expect_config_error(setup, "variable_iteration.py", line_of(text, "HERE"), [name])


def test_colliding_ids_in_underscore_mode(setup):
    setup.write(variables="""\
        TASK_FOLDER_LOCATION = "VARIABLE_UNDERSCORE"

        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2], nicknames=["a_b", "a"])
            variable_set.add_variable(name="y", values=[3, 4], nicknames=["c", "b_c"])
        """)
    expect_config_error(setup, "variable_iteration.py", needles=["a_b_c"])


def test_underscore_mode_without_collisions_still_runs(setup):
    """The control for the case above: the same shape without a collision runs."""
    setup.write(variables="""\
        TASK_FOLDER_LOCATION = "VARIABLE_UNDERSCORE"

        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2], nicknames=["a_b", "a"])
            variable_set.add_variable(name="y", values=[3, 4], nicknames=["c", "d"])
        """)
    result = setup.run(timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(setup.successful()) == sorted(["1", "old/task", "a_b_c", "a_b_d", "a_c",
                                                 "a_d"])


# -- hooks that are not functions ----------------------------------------------

@pytest.mark.parametrize("hook", ["before_all_tasks", "after_all_tasks", "before_each_worker",
                                  "after_each_worker", "before_each_task", "after_each_task",
                                  "verify_task_success"])
def test_task_hook_that_is_not_a_function(setup, hook):
    text = setup.good_task.replace("def before_all_tasks", "def _unused_before_all") + \
        "\n%s = True  # HERE\n" % hook
    setup.write(task=text)
    expect_config_error(setup, "task_specification.py", line_of(text, "HERE"), [hook])


@pytest.mark.parametrize("hook", ["on_task_success", "on_task_failure"])
def test_result_hook_that_is_not_a_function(setup, hook):
    text = GOOD_VARIABLES + "\n%s = 'print'  # HERE\n" % hook
    setup.write(variables=text)
    expect_config_error(setup, "variable_iteration.py", line_of(text, "HERE"), [hook])


def test_converter_that_is_not_a_function(setup):
    """x_to_value names the converter of the variable x; a value that is no
    function must be refused, not ignored (the tasks would get the raw
    values in place of what the user meant them to get)."""
    text = GOOD_VARIABLES + "\nx_to_value = 3  # HERE\n"
    setup.write(variables=text)
    expect_config_error(setup, "variable_iteration.py", line_of(text, "HERE"), ["x_to_value"])


# -- hostile names that only show up once folders are made -----------------------

def test_underscore_id_too_long_for_one_folder(setup):
    """Joined with "_", two 150-character nicknames make a 301-byte folder name,
    longer than any filesystem allows: that is caught before anything runs,
    not left to fail every such task at run time."""
    setup.write(variables="""\
        TASK_FOLDER_LOCATION = "VARIABLE_UNDERSCORE"

        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=["a" * 150])
            variable_set.add_variable(name="y", values=["b" * 150, "c"])
        """)
    expect_config_error(setup, "variable_iteration.py", needles=[
        "the folder name '%s_%s' is longer than a filesystem allows (255 bytes)"
        % ("a" * 150, "b" * 150), 'TASK_FOLDER_LOCATION = "VARIABLE_SUBFOLDER"'])


def test_value_that_is_not_valid_unicode_runs_in_a_folder_it_can_have(setup):
    """A lone surrogate (from a badly decoded file name, say) in a value
    without a nickname: the folder gets "_" in its place, and the task gets
    the value itself."""
    setup.write(task="""\
        import os

        def task_method(variables, task_folder, log_file):
            with open(os.path.join(task_folder, "value.txt"), "w") as stream:
                stream.write(ascii(variables["x"]))
        """, variables="""\
        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=["ok", "bad\\ud800name"])
        """)
    result = setup.run(timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert setup.successful()[:2] == ["1", "old/task"]            # the earlier results
    assert sorted(setup.successful()[2:]) == ["bad_name", "ok"]
    assert setup.failed() == {}
    assert sorted(os.listdir(setup.outputs)) == ["bad_name", "ok"]
    assert setup.output("bad_name", "value.txt") == ascii("bad\ud800name")
    assert setup.output("ok", "value.txt") == ascii("ok")
    assert [task["task_id"] for task in setup.all_tasks()] == ["ok", "bad_name"]

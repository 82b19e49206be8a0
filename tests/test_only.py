"""`run --only NAME=VALUE[,VALUE...]` and `run --limit N`: which tasks run, what
is said about it, with and without --dry-run, and the usage errors (exit 2,
nothing run)."""

import json
import os
import re

import pytest

VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["gpt2", "google-bert/bert-base-uncased"],
                              nicknames=["GPT2", "BERT"])
    variable_set.add_variable(name="dataset", values=["happy", "sad"],
                              exceptions={"BERT": ["happy"]})
    variable_set.add_variable(name="seed", values=[0, 1111, 2222], nicknames=["s0", "s1", "s2"])
"""
# GPT2: 2 datasets x 3 seeds; BERT: happy only x 3 seeds.
ALL_TASKS = ["GPT2/happy/s0", "GPT2/happy/s1", "GPT2/happy/s2",
             "GPT2/sad/s0", "GPT2/sad/s1", "GPT2/sad/s2",
             "BERT/happy/s0", "BERT/happy/s1", "BERT/happy/s2"]

TASK = """
import json
import os


def task_method(variables, task_folder, log_file):
    with open(os.path.join(task_folder, "variables.json"), "w") as stream:
        json.dump(variables, stream)
"""


@pytest.fixture
def sweep(project):
    project.write(task=TASK, variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    return project


def explain(result):
    return "exit %s\n--- stdout\n%s--- stderr\n%s" % (result.returncode, result.stdout,
                                                      result.stderr)


def listed(out):
    """Task IDs a dry run lists."""
    return re.findall(r"^  ((?:GPT2|BERT)/\S+)\s", out, re.M)


def assert_nothing_ran(project):
    assert project.successful() == [] and project.failed() == {}
    assert not os.path.exists(project.outputs)


def test_only_by_value_runs_the_matching_tasks_and_all_tasks_json_lists_every_task(sweep):
    result = sweep.run("--only", "model=gpt2")
    assert result.returncode == 0, explain(result)
    assert "--only model=gpt2: 6 of 9 tasks selected" in result.stdout, explain(result)
    assert sorted(sweep.successful()) == sorted(ALL_TASKS[:6])
    assert [task["task_id"] for task in sweep.all_tasks()] == ALL_TASKS
    with open(os.path.join(sweep.outputs, "GPT2", "sad", "s1", "variables.json")) as stream:
        assert json.load(stream) == {"model": "gpt2", "dataset": "sad", "seed": 1111}
    # A rerun without --only runs the rest, and only the rest.
    result = sweep.run()
    assert result.returncode == 0, explain(result)
    assert "6 of 9 tasks already succeeded; running 3 tasks" in result.stdout, explain(result)
    assert sorted(sweep.successful()) == sorted(ALL_TASKS)


def test_only_by_nickname_and_a_number_by_its_value(sweep):
    result = sweep.run("--only", "model=BERT", "--only", "seed=2222")
    assert result.returncode == 0, explain(result)
    assert "--only model=BERT --only seed=2222: 1 of 9 tasks selected" in result.stdout
    assert sweep.successful() == ["BERT/happy/s2"]


def test_repeated_only_is_and_and_a_comma_list_is_or(sweep):
    result = sweep.run("--only", "dataset=happy", "--only", "seed=s0,1111")
    assert result.returncode == 0, explain(result)
    assert ": 4 of 9 tasks selected" in result.stdout, explain(result)
    assert sorted(sweep.successful()) == sorted(
        ["GPT2/happy/s0", "GPT2/happy/s1", "BERT/happy/s0", "BERT/happy/s1"])
    # The same variable twice: both must hold.
    result = sweep.run("--only", "seed=s0,s1", "--only", "seed=s1,s2")
    assert result.returncode == 0, explain(result)
    assert ": 3 of 9 tasks selected" in result.stdout, explain(result)
    assert "2 of 3 tasks already succeeded; running 1 task" in result.stdout, explain(result)
    assert sweep.successful()[-1] == "GPT2/sad/s1"


def test_fresh_with_only_forgets_only_the_selected_tasks(sweep):
    assert sweep.run().returncode == 0
    before = sweep.successful()
    result = sweep.run("--fresh", "--only", "seed=s1")
    assert result.returncode == 0, explain(result)
    assert "running 3 tasks" in result.stdout, explain(result)
    after = sweep.successful()
    assert [i for i in after if not i.endswith("/s1")] == [i for i in before
                                                         if not i.endswith("/s1")]
    assert sorted(after) == sorted(ALL_TASKS)
    # --limit does not narrow what --fresh forgets: a fresh start, one task first.
    result = sweep.run("--fresh", "--limit", "1")
    assert result.returncode == 0, explain(result)
    assert sweep.successful() == ["GPT2/happy/s0"]
    result = sweep.run()
    assert "1 of 9 tasks already succeeded; running 8 tasks" in result.stdout, explain(result)


def test_limit_runs_the_first_tasks_still_to_run(sweep):
    result = sweep.run("--limit", "1")
    assert result.returncode == 0, explain(result)
    assert "--limit 1: the first 1 of the 9 tasks to run" in result.stdout, explain(result)
    assert sweep.successful() == ["GPT2/happy/s0"]
    # The next one counts from the tasks not yet succeeded.
    result = sweep.run("--limit", "2")
    assert result.returncode == 0, explain(result)
    assert "--limit 2: the first 2 of the 8 tasks to run" in result.stdout, explain(result)
    assert "1 of 9 tasks already succeeded; running 2 tasks" in result.stdout, explain(result)
    assert sorted(sweep.successful()) == sorted(ALL_TASKS[:3])


def test_limit_with_only(sweep):
    result = sweep.run("--only", "model=BERT", "--limit", "5")
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert "--only model=BERT: 3 of 9 tasks selected" in out and \
        "--limit 5: all 3 tasks to run" in out, explain(result)
    assert sorted(sweep.successful()) == ALL_TASKS[6:]


def test_dry_run_with_only_and_limit_lists_what_a_run_would_run_and_runs_nothing(sweep):
    result = sweep.run("--dry-run", "--only", "model=GPT2", "--only", "dataset=sad")
    assert result.returncode == 0, explain(result)
    assert "--only model=GPT2 --only dataset=sad: 3 of 9 tasks selected" in result.stdout
    assert "dry run: 3 tasks to run; nothing is started" in result.stdout, explain(result)
    assert listed(result.stdout) == ["GPT2/sad/s0", "GPT2/sad/s1", "GPT2/sad/s2"]
    assert_nothing_ran(sweep)
    result = sweep.run("--dry-run", "--limit", "2")
    assert result.returncode == 0, explain(result)
    assert "--limit 2: the first 2 of the 9 tasks to run" in result.stdout, explain(result)
    assert listed(result.stdout) == ALL_TASKS[:2]
    assert_nothing_ran(sweep)
    # After a run, --limit in a dry run skips what has succeeded, as a run does.
    assert sweep.run("--limit", "1").returncode == 0
    result = sweep.run("--dry-run", "--limit", "1")
    assert listed(result.stdout) == ["GPT2/happy/s1"], explain(result)


@pytest.mark.parametrize("arguments, message", [
    (["--only", "modle=gpt2"], "there is no variable 'modle'; the variables are model, "
                               "dataset, seed"),
    (["--only", "model=gpt5"], "'gpt5' is not a value or nickname of model; its values are "
                               "gpt2 or GPT2, google-bert/bert-base-uncased or BERT"),
    (["--only", "seed=3"], "'3' is not a value or nickname of seed; its values are 0 or s0, "
                           "1111 or s1, 2222 or s2"),
    (["--only", "seed=s0,,s1"], "'' is not a value or nickname of seed"),
    (["--only", "model"], "give NAME=VALUE[,VALUE...], e.g. --only model=GPT2"),
    (["--only", "model=BERT", "--only", "dataset=sad"], "no task has all of these"),
    (["--only", "seed=s0", "--only", "seed=s1"], "no task has all of these"),
    (["--limit", "0"], "'0' is not a whole number of tasks, 1 or more"),
    (["--limit", "one"], "'one' is not a whole number of tasks, 1 or more"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_bad_selection_is_a_usage_error_and_runs_nothing(sweep, arguments, message, dry_run):
    sweep.write(task=TASK + """
def before_all_tasks():
    open(os.path.join(os.path.dirname(__file__), "before_all_tasks_ran"), "w").close()
""")
    result = sweep.run(*(arguments + (["--dry-run"] if dry_run else [])))
    assert result.returncode == 2, explain(result)
    assert message in result.stderr, explain(result)
    assert_nothing_ran(sweep)
    assert not os.path.exists(os.path.join(sweep.config, "before_all_tasks_ran"))
    assert not os.path.exists(os.path.join(sweep.config, "worker_logs"))


def test_a_long_value_list_is_shortened_in_the_message(project):
    project.write(variables="""
        def setup_variable_set(variable_set):
            variable_set.add_variable(name="seed", values=list(range(1000)))
        """)
    result = project.run("--only", "seed=abc")
    assert result.returncode == 2, explain(result)
    assert "its values are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (990 more)" in result.stderr


def test_from_code_only_and_limit_are_keywords(sweep):
    import io
    import threadward
    out = io.StringIO()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        code = threadward.Threadward(sweep.dir, only=["model=GPT2", "dataset=sad"], limit=2,
                                     stdin_fd=null, out=out).run()
    finally:
        os.close(null)
    assert code == 0, out.getvalue()
    assert "--limit 2: the first 2 of the 3 tasks to run" in out.getvalue()
    assert sorted(sweep.successful()) == ["GPT2/sad/s0", "GPT2/sad/s1"]
    with pytest.raises(threadward.ThreadwardError, match="whole number"):
        threadward.Threadward(sweep.dir, limit=0).run()

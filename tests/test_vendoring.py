"""Vendoring is one file: threadward.py copied alone can `init` and `run`.

Without templates/ beside it, `init` writes the short versions built into
the module; these tests run them end to end and check that they set only
settings (and define only hooks) that the full templates have, so the two
cannot drift apart unseen.
"""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

import threadward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADWARD = os.path.join(ROOT, "threadward.py")
TEMPLATES = os.path.join(ROOT, "templates")
INSTALLED_TEMPLATES = os.path.join(sys.prefix, "share", "threadward", "templates")


def copied_alone(folder):
    """threadward.py, and nothing else, in a folder of its own."""
    folder.mkdir()
    shutil.copy(THREADWARD, str(folder))
    return folder


def run(folder, *argv):
    """`python threadward.py ARGV` in ``folder``, stdin at /dev/null, with no
    PYTHONPATH and a user base of its own: only the copy can be found."""
    env = dict(os.environ, PYTHONUSERBASE=str(folder / "no-user-base"))
    for name in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "threadward.py"] + list(argv), cwd=str(folder),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120, env=env)


def explain(result):
    return "exit %s\n--- stdout\n%s--- stderr\n%s" % (
        result.returncode, result.stdout, result.stderr)


def read(path):
    with open(str(path)) as stream:
        return stream.read()


def top_level(text):
    """(names assigned, functions defined) at the top level of a module's source."""
    tree = ast.parse(text)
    assigned = {target.id for node in tree.body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return assigned, functions


@pytest.mark.skipif(os.path.isdir(INSTALLED_TEMPLATES),
                    reason="this interpreter has installed templates at %s" % INSTALLED_TEMPLATES)
def test_threadward_py_copied_alone_inits_and_runs(tmp_path):
    folder = copied_alone(tmp_path / "vendor")
    result = run(folder, "init", "proj")
    assert result.returncode == 0, explain(result)
    assert "short versions" in result.stdout
    config = folder / "proj" / "threadward"
    for name in threadward.CONFIG_FILES:
        text = read(config / name)
        assert text == threadward._template_text(None, name)
        assert text.splitlines()[0] == "# Short version. Full, commented: templates/%s in " \
            "the threadward repository" % name

    result = run(folder, "run", "proj")
    assert result.returncode == 0, explain(result)
    assert "Traceback" not in result.stderr
    assert "6 succeeded, 0 failed" in result.stdout
    queue = config / "task_queue"
    expected = ["%s/%d" % (model, seed) for model in ("small", "large") for seed in (0, 1, 2)]
    assert sorted(read(queue / "successful_tasks.txt").split()) == sorted(expected)
    assert read(queue / "failed_tasks.txt") == ""
    tasks = json.loads(read(queue / "all_tasks.json"))
    assert [task["task_id"] for task in tasks] == expected
    for task in tasks:
        written = json.loads(read(config / "task_outputs" / task["task_id"] / "result.json"))
        assert written == {name: entry["value"] for name, entry in task["variables"].items()}


def test_with_templates_beside_it_init_writes_the_full_ones(tmp_path):
    folder = copied_alone(tmp_path / "vendor")
    shutil.copytree(TEMPLATES, str(folder / "templates"))
    result = run(folder, "init", "proj")
    assert result.returncode == 0, explain(result)
    assert "short versions" not in result.stdout
    for name in threadward.CONFIG_FILES:
        assert read(folder / "proj" / "threadward" / name) == read(os.path.join(TEMPLATES, name))


@pytest.mark.parametrize("name", threadward.CONFIG_FILES)
def test_the_short_versions_set_only_what_the_full_templates_set(name):
    short_settings, short_functions = top_level(threadward._COMPACT_TEMPLATES[name])
    full_settings, full_functions = top_level(read(os.path.join(TEMPLATES, name)))
    settings = {n for n in short_settings if n.isupper()}
    assert settings, "the short %s sets no setting" % name
    assert settings <= set(threadward.SETTINGS[name]), "not a setting of %s" % name
    assert settings <= full_settings, "the full template does not show it"
    assert short_functions <= full_functions, "a hook the full template does not have"


def test_the_short_versions_pass_the_setting_checks(tmp_path):
    """A slip in a setting's name or file would be a configuration error."""
    for name in threadward.CONFIG_FILES:
        path = tmp_path / name
        path.write_text(threadward._template_text(None, name))
        threadward._check_setting_names(str(path))

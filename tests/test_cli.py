"""The command line end to end, in real subprocesses and temporary folders.

`init` (what it creates, that it never overwrites), the templates running as
they are, `--version`/`--help`/usage errors, `run --dry-run`, the four ways to
launch threadward (a direct path, `python -m threadward`, a vendored copy, the
console script of an installed copy), headless runs (stdin at /dev/null, a
regular file, a closed pipe, fd 0 closed) and the exit codes 0, 1 and 2.
"""

import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys

import pytest

from conftest import (ROOT, TASK_IMPORTS_WAIT_FOR, THREADWARD, assert_no_processes_left,
                      run_until)

import threadward

CONFIG_FILES = ("task_specification.py", "resource_constraints.py", "variable_iteration.py")
QUEUE_FILES = ("all_tasks.json", "successful_tasks.txt", "failed_tasks.txt")
TEMPLATES = os.path.join(ROOT, "templates")
DIRECT = [sys.executable, THREADWARD]

# Appended to the template task_specification.py: every task, and
# before_all_tasks in the main process, record which threadward module is
# running them, and whether `import threadward` gives that very module object.
PROBE = '''

# --- appended by tests/test_cli.py ---------------------------------------
import json as _json
import os as _os

_template_task_method = task_method


def _probe(path):
    import sys
    import threadward
    frame = sys._getframe(1)
    while frame is not None and "_WorkerProcess" not in frame.f_globals:
        frame = frame.f_back
    with open(path, "w") as stream:
        _json.dump({"file": threadward.__file__, "pid": _os.getpid(),
                    "same_module": frame is not None and frame.f_globals is vars(threadward)},
                   stream)


def task_method(variables, task_folder, log_file):
    _template_task_method(variables, task_folder, log_file)
    _probe(_os.path.join(task_folder, "probe.json"))


def before_all_tasks():
    _probe(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "main_probe.json"))
'''


# -- helpers ------------------------------------------------------------------

def clean_env(**extra):
    """The environment without anything that would pick a threadward for us."""
    env = dict(os.environ)
    for name in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH", "PYTHONSTARTUP"):
        env.pop(name, None)
    env.update(extra)
    return env


def cli(argv, cwd, stdin=subprocess.DEVNULL, env=None, timeout=120):
    return subprocess.run(list(argv), cwd=str(cwd), stdin=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout,
                          env=env or clean_env())


def explain(result):
    return "exit %s\n--- stdout\n%s--- stderr\n%s" % (
        result.returncode, result.stdout, result.stderr)


def snapshot(directory):
    """{relative path: (bytes, mtime_ns)} of every file under directory."""
    found = {}
    for folder, _, files in os.walk(str(directory)):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as stream:
                found[os.path.relpath(path, str(directory))] = (stream.read(),
                                                                os.stat(path).st_mtime_ns)
    return found


def read(path):
    with open(str(path)) as stream:
        return stream.read()


def queue_lines(directory, name):
    return [line for line in read(os.path.join(str(directory), "threadward", "task_queue",
                                               name)).split("\n") if line]


def assert_initialised(directory):
    config = os.path.join(str(directory), "threadward")
    for name in CONFIG_FILES:
        assert read(os.path.join(config, name)) == read(os.path.join(TEMPLATES, name)), name
    for name in QUEUE_FILES:
        assert os.path.isfile(os.path.join(config, "task_queue", name)), name
    for name in QUEUE_FILES[1:]:
        assert read(os.path.join(config, "task_queue", name)) == "", name


def assert_no_leftovers(directory):
    assert_no_processes_left(str(directory))


def assert_template_run(result, directory):
    """A clean run of the template sweep: every task succeeded, each wrote its
    result.json, and the console showed start line, progress and summary."""
    assert result.returncode == 0, explain(result)
    config = os.path.join(str(directory), "threadward")
    with open(os.path.join(config, "task_queue", "all_tasks.json")) as stream:
        tasks = json.load(stream)
    ids = [task["task_id"] for task in tasks]
    count = len(ids)
    assert count > 1 and len(set(ids)) == count
    assert sorted(queue_lines(directory, "successful_tasks.txt")) == sorted(ids)
    assert queue_lines(directory, "failed_tasks.txt") == []
    for task in tasks:
        folder = os.path.join(str(directory), task["task_folder"])
        assert os.path.isfile(os.path.join(folder, "result.json")), task
    lines = result.stdout.splitlines()
    start = [i for i, line in enumerate(lines)
             if re.match(r"running %d tasks on \d+ workers?\b" % count, line)]
    assert start, explain(result)
    progress = [i for i, line in enumerate(lines)
                if re.match(r"\[[^\]]+\] \d+/%d done, 0 failed\b" % count, line)]
    assert progress and progress[0] > start[0], explain(result)
    assert "%d/%d done" % (count, count) in lines[progress[-1]]
    assert re.match(r"done in \S+: %d succeeded, 0 failed$" % count, lines[-2]), explain(result)
    assert lines[-1] == "report: threadward/report.html", explain(result)
    assert_no_leftovers(directory)
    return tasks


def vendor(destination, templates=True):
    """A vendored copy: threadward.py (and templates/) in a folder of their own."""
    os.makedirs(str(destination))
    shutil.copy(THREADWARD, str(destination))
    if templates:
        shutil.copytree(TEMPLATES, os.path.join(str(destination), "templates"))
    return os.path.join(str(destination), "threadward.py")


# -- an installed copy with its console script (built once per module) -------

@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A throwaway venv with threadward installed (not editable) from a copy of
    the source: its console script, and the site-packages it went to.

    The venv is made --without-pip and sees this interpreter's site-packages
    through a .pth file (pip, setuptools, psutil come from there; that file's
    own .pth hooks, such as an editable threadward, are not run)."""
    for name in ("venv", "pip", "setuptools"):
        if importlib.util.find_spec(name) is None:
            pytest.skip("%s is unavailable to %s (needed to build and install offline)"
                        % (name, sys.executable))
    base = tmp_path_factory.mktemp("installed")
    source = base / "source"
    os.makedirs(str(source))
    for name in ("threadward.py", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), str(source))
    shutil.copytree(TEMPLATES, str(source / "templates"))
    environment = base / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    if made.returncode:
        pytest.skip("python -m venv failed: %s" % made.stdout)
    python = str(environment / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                            "['purelib'])"], stdout=subprocess.PIPE,
                             universal_newlines=True, check=True).stdout.strip()
    os.makedirs(purelib, exist_ok=True)
    with open(os.path.join(purelib, "_outer_site_packages.pth"), "w") as stream:
        outer = site.getsitepackages()
        if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
            outer.append(site.getusersitepackages())
        stream.write("\n".join(outer) + "\n")
    env = clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    installing = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--ignore-installed", str(source)], cwd=str(base), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if installing.returncode and "bdist_wheel" in installing.stdout:
        # setuptools < 70.1 without the `wheel` package cannot build a wheel
        # offline; install the way pip used to (same data_files, same script).
        installing = subprocess.run(
            [python, "setup.py", "-q", "install", "--single-version-externally-managed",
             "--record", str(base / "record.txt"), "--prefix", str(environment)],
            cwd=str(source), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True)
    assert installing.returncode == 0, installing.stdout
    script = str(environment / "bin" / "threadward")
    assert os.access(script, os.X_OK), installing.stdout
    return {"script": script, "module": os.path.join(purelib, "threadward.py"),
            "purelib": purelib, "prefix": str(environment)}


# -- init -----------------------------------------------------------------------

def test_init_creates_the_project_tree(tmp_path):
    target = tmp_path / "new" / "project"
    result = cli(DIRECT + ["init", str(target)], cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    assert_initialised(target)
    for name in CONFIG_FILES + QUEUE_FILES:
        assert re.search(r"^created .*%s$" % re.escape(name), result.stdout, re.M), name
    assert "left alone" not in result.stdout
    assert not os.path.exists(os.path.join(str(target), "threadward", "task_outputs"))


def test_init_defaults_to_the_current_directory(tmp_path):
    result = cli(DIRECT + ["init"], cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    assert_initialised(tmp_path)
    assert sorted(os.listdir(str(tmp_path))) == ["threadward"]


def test_second_init_changes_no_file_and_says_which_it_left_alone(tmp_path):
    assert cli(DIRECT + ["init", str(tmp_path)], cwd=tmp_path).returncode == 0
    config = tmp_path / "threadward"
    with open(str(config / "task_specification.py"), "a") as stream:
        stream.write("\n# MARKER: edited by the user\n")
    with open(str(config / "task_queue" / "successful_tasks.txt"), "w") as stream:
        stream.write("some/earlier/task\n")
    before = snapshot(tmp_path)
    result = cli(DIRECT + ["init", str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    assert snapshot(tmp_path) == before
    assert "# MARKER: edited by the user" in read(config / "task_specification.py")
    assert "created" not in result.stdout
    assert "left alone" in result.stdout
    for name in CONFIG_FILES + QUEUE_FILES:
        assert name in result.stdout, name


def test_init_fills_in_only_the_missing_files(tmp_path):
    assert cli(DIRECT + ["init"], cwd=tmp_path).returncode == 0
    config = tmp_path / "threadward"
    os.remove(str(config / "resource_constraints.py"))
    os.remove(str(config / "task_queue" / "failed_tasks.txt"))
    with open(str(config / "variable_iteration.py"), "a") as stream:
        stream.write("# MARKER\n")
    result = cli(DIRECT + ["init"], cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    created = re.findall(r"^created (.*)$", result.stdout, re.M)
    assert sorted(os.path.basename(path) for path in created) == [
        "failed_tasks.txt", "resource_constraints.py"]
    assert read(config / "resource_constraints.py") == read(
        os.path.join(TEMPLATES, "resource_constraints.py"))
    assert read(config / "variable_iteration.py").endswith("# MARKER\n")
    left_alone = result.stdout.split("left alone", 1)[1]
    assert "variable_iteration.py" in left_alone and "task_specification.py" in left_alone


def test_init_through_a_link_to_the_module_finds_the_templates_beside_the_file(tmp_path):
    """A strict editable install (what `make` does) imports threadward.py
    through a link in build/__editable__...: templates/ is beside the file."""
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(THREADWARD, str(links / "threadward.py"))
    result = cli([sys.executable, str(links / "threadward.py"), "init", str(tmp_path / "proj")],
                 cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    assert os.path.isfile(str(tmp_path / "proj" / "threadward" / "task_specification.py"))


# -- the templates run as they are ------------------------------------------

def test_templates_run_as_they_are(tmp_path):
    assert cli(DIRECT + ["init"], cwd=tmp_path).returncode == 0
    result = cli(DIRECT + ["run"], cwd=tmp_path)
    tasks = assert_template_run(result, tmp_path)
    assert result.stderr == ""
    # A rerun finds every task done, runs nothing and says so.
    again = cli(DIRECT + ["run"], cwd=tmp_path)
    assert again.returncode == 0, explain(again)
    assert "all %d tasks already succeeded" % len(tasks) in again.stdout
    assert sorted(queue_lines(tmp_path, "successful_tasks.txt")) == sorted(
        task["task_id"] for task in tasks)


# -- options and usage errors -----------------------------------------------

def test_version():
    result = cli(DIRECT + ["--version"], cwd=ROOT)
    assert result.returncode == 0, explain(result)
    assert result.stdout.strip() == "threadward %s" % threadward.__version__


def test_help_lists_the_subcommands():
    result = cli(DIRECT + ["--help"], cwd=ROOT)
    assert result.returncode == 0, explain(result)
    for command in ("init", "run", "status"):
        assert re.search(r"\b%s\b" % command, result.stdout), command


@pytest.mark.parametrize("argv", [["bogus"], [], ["run", "--no-such-option"],
                                  ["init", "a", "b"]])
def test_usage_errors_exit_2(tmp_path, argv):
    result = cli(DIRECT + argv, cwd=tmp_path)
    assert result.returncode == 2, explain(result)
    assert "usage:" in result.stderr
    assert os.listdir(str(tmp_path)) == []


def test_dry_run_prints_the_plan_and_runs_nothing(project):
    project.write(variables="""
        def setup_variable_set(variable_set):
            variable_set.add_variable(name="x", values=[1, 2, 3])
            variable_set.add_variable(name="y", values=["a", "b"])
        """)
    result = project.run("--dry-run")
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert re.search(r"\b6 tasks\b", out), out
    for task_id in ("1/a", "1/b", "3/b"):
        assert re.search(r"^\s+%s\s+\S*threadward/task_outputs/%s$" % (task_id, task_id),
                         out, re.M), out
    assert re.search(r"^\s+worker 0\b", out, re.M) and re.search(r"^\s+worker 1\b", out, re.M)
    assert not re.search(r"^\s+worker 2\b", out, re.M)
    assert project.successful() == [] and project.failed() == {}
    assert not os.path.exists(project.outputs)
    assert not os.path.exists(os.path.join(project.config, "worker_logs"))
    assert "done in" not in out


# -- the ways to launch -------------------------------------------------------

LAUNCHES = ["path", "module-from-repo", "module-on-pythonpath", "vendored", "console-script"]


@pytest.mark.parametrize("launch", LAUNCHES)
def test_launch(tmp_path, request, launch):
    """init + run of the template sweep; the workers (and the main process's
    hooks) run the very module that was launched, and `import threadward` in a
    task gives that module."""
    project = tmp_path / "my project"
    os.makedirs(str(project))
    cwd, directory, env = project, [], clean_env()
    if launch == "path":
        prefix, expected = DIRECT, THREADWARD
    elif launch == "module-from-repo":
        prefix, expected = [sys.executable, "-m", "threadward"], THREADWARD
        cwd, directory = ROOT, [str(project)]
    elif launch == "module-on-pythonpath":
        prefix, expected = [sys.executable, "-m", "threadward"], THREADWARD
        env = clean_env(PYTHONPATH=ROOT)
    elif launch == "vendored":
        expected = vendor(tmp_path / "home" / "tools")
        prefix = [sys.executable, expected]
    else:
        install = request.getfixturevalue("installed")
        prefix, expected = [install["script"]], install["module"]
    result = cli(prefix + ["init"] + directory, cwd=cwd, env=env)
    assert result.returncode == 0, explain(result)
    assert_initialised(project)
    with open(str(project / "threadward" / "task_specification.py"), "a") as stream:
        stream.write(PROBE)
    result = cli(prefix + ["run"] + directory, cwd=cwd, env=env)
    tasks = assert_template_run(result, project)
    with open(str(project / "threadward" / "main_probe.json")) as stream:
        main_probe = json.load(stream)
    assert os.path.samefile(main_probe["file"], expected), main_probe
    assert main_probe["same_module"], main_probe
    worker_pids = set()
    for task in tasks:
        with open(os.path.join(str(project), task["task_folder"], "probe.json")) as stream:
            probe = json.load(stream)
        assert os.path.samefile(probe["file"], expected), (task["task_id"], probe)
        assert probe["same_module"], (task["task_id"], probe)
        worker_pids.add(probe["pid"])
    assert main_probe["pid"] not in worker_pids


def test_installed_copy_uses_templates_installed_as_data_files(installed, tmp_path):
    assert not os.path.exists(os.path.join(installed["purelib"], "templates"))
    assert os.path.isdir(os.path.join(installed["prefix"], "share", "threadward", "templates"))
    result = cli([installed["script"], "--version"], cwd=tmp_path)
    assert result.stdout.strip() == "threadward %s" % threadward.__version__, explain(result)
    result = cli([installed["script"], "init", "proj"], cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    assert_initialised(tmp_path / "proj")


# -- headless runs ------------------------------------------------------------

def write_file(path, text):
    with open(str(path), "w") as stream:
        stream.write(text)
    return str(path)


@pytest.mark.parametrize("stdin", ["devnull", "empty-file", "file-of-commands", "closed-pipe",
                                   "idle-pipe", "fd-0-closed"])
def test_headless_run_completes(project, tmp_path, stdin):
    """End of input (or no stdin at all) ends only the console: the run goes on."""
    if stdin == "devnull":
        result = project.run(stdin=subprocess.DEVNULL)
    elif stdin in ("empty-file", "file-of-commands"):
        path = write_file(tmp_path / "commands.txt",
                          "" if stdin == "empty-file" else "show\nhelp\n")
        with open(path) as stream:
            result = project.run(stdin=stream)
    elif stdin in ("closed-pipe", "idle-pipe"):
        process = subprocess.Popen(project.command(), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, env=project.env())
        if stdin == "closed-pipe":
            process.stdin.close()
        try:
            # wait() before reading: communicate() would close an idle stdin.
            # The output is a few lines, far below a pipe's capacity.
            process.wait(timeout=120)
            out, err = process.stdout.read(), process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if not stream.closed:
                    stream.close()
        result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    else:
        result = subprocess.run(["sh", "-c", 'exec 0<&-; exec "$@"', "sh"] + project.command(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=120, env=project.env())
    assert result.returncode == 0, explain(result)
    assert sorted(project.successful()) == ["1", "2", "3"]
    assert project.failed() == {}
    assert re.search(r"^done in \S+: 3 succeeded, 0 failed$", result.stdout, re.M), \
        explain(result)


def test_quit_from_a_regular_file_stops_the_run_early(project, tmp_path):
    """The tasks wait for a gate the test opens once the run has said it quit,
    so what runs does not depend on how fast anything is."""
    gate = tmp_path / "gate"
    project.write(task=TASK_IMPORTS_WAIT_FOR + """
import os

def task_method(variables, task_folder, log_file):
    wait_for(lambda: os.path.exists(%r), timeout=120, message="the test to open the gate")
""" % str(gate), variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(10)))
""", resources="NUM_WORKERS = 1\n")
    path = write_file(tmp_path / "commands.txt", "q\n")
    with open(path) as stream:
        result = run_until(project, stream, "then teardown\n", gate)
    assert result.returncode == 1, explain(result)
    # The commands of a file are read at once: the quit may come before the
    # first task starts or while it runs; no task starts after it.
    running = int(re.search(r"^quit: no new tasks; waiting for (\d+) running task\(s\), then "
                            r"teardown$", result.stdout, re.M).group(1))
    assert running <= 1, explain(result)
    assert project.successful() == ["0"][:running]
    assert project.failed() == {}
    assert re.search(r"^stopped \(quit\) in \S+: %d succeeded, 0 failed, %d not run$"
                     % (running, 10 - running), result.stdout, re.M), explain(result)


# -- exit codes -----------------------------------------------------------------

def test_exit_0_when_every_task_succeeds(project):
    result = project.run()
    assert result.returncode == 0, explain(result)
    assert sorted(project.successful()) == ["1", "2", "3"]


def test_exit_1_when_a_task_fails(project):
    project.write(task="""
        def task_method(variables, task_folder, log_file):
            if variables["x"] == 2:
                raise ValueError("boom")
        """)
    result = project.run()
    assert result.returncode == 1, explain(result)
    assert sorted(project.successful()) == ["1", "3"]
    assert list(project.failed()) == ["2"]
    assert re.search(r"^FAILED 2\b.*boom", result.stdout, re.M), explain(result)
    assert re.search(r"^done in \S+: 2 succeeded, 1 failed$", result.stdout, re.M)


def test_exit_2_without_a_threadward_folder(tmp_path):
    result = cli(DIRECT + ["run"], cwd=tmp_path)
    assert result.returncode == 2, explain(result)
    assert "threadward init" in result.stderr
    assert "Traceback" not in result.stderr
    assert "running" not in result.stdout
    assert os.listdir(str(tmp_path)) == []


@pytest.mark.parametrize("mistake", ["missing-file", "unknown-setting", "no-task-method"])
def test_exit_2_for_a_configuration_error_before_anything_runs(project, mistake):
    if mistake == "missing-file":
        os.remove(os.path.join(project.config, "variable_iteration.py"))
        expected = ["variable_iteration.py", "threadward init"]
    elif mistake == "unknown-setting":
        project.write(task="""
            OUTPUT_MODE = "LOUD"

            def task_method(variables, task_folder, log_file):
                pass
            """)
        expected = ["task_specification.py:2", "OUTPUT_MODE", "LOG_FILE_ONLY", "CONSOLE_ONLY",
                    "LOG_FILE_AND_CONSOLE"]
    else:
        project.write(task="def task_method_typo(variables, task_folder, log_file):\n    pass\n")
        expected = ["task_specification.py", "task_method"]
    result = project.run()
    assert result.returncode == 2, explain(result)
    for text in expected:
        assert text in result.stderr, (text, explain(result))
    assert "Traceback" not in result.stderr
    assert "running" not in result.stdout
    assert project.successful() == [] and project.failed() == {}
    assert not os.path.exists(project.outputs)
    assert not os.path.exists(os.path.join(project.config, "worker_logs"))

"""Helpers of the real-workload suite (`make test-ml`): PyTorch, joblib, scikit-learn,
multiprocessing and tqdm inside real threadward runs.

Every test here uses the libraries a researcher would; nothing is faked but
the GPUs (and the CUDA tests skip where there is no real one).  The shared
fixtures (`project`, `wait_for`) come from tests/conftest.py.
"""

import json
import os
import signal
import subprocess

import psutil
import pytest

LIBRARIES = ("torch", "joblib", "sklearn", "numpy", "tqdm")


def need_libraries():
    """Skip the calling module where the real libraries are not installed."""
    for library in LIBRARIES:
        pytest.importorskip(library, reason="the real-workload suite needs %s; "
                                            "`make test-ml` installs it" % library)


def results(project):
    """{task_id: the result.json its task wrote}, for the tasks that wrote one."""
    found = {}
    for task in project.all_tasks():
        path = os.path.join(project.outputs, task["task_id"], "result.json")
        if os.path.exists(path):
            with open(path) as stream:
                found[task["task_id"]] = json.load(stream)
    return found


def alive(pid):
    """True if ``pid`` is a running (not zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def logs(project):
    """Every task log and worker log of the project, joined."""
    text = []
    for top in (project.outputs, os.path.join(project.config, "worker_logs")):
        for folder, _, files in os.walk(top):
            for name in files:
                if name.endswith(".log"):
                    with open(os.path.join(folder, name), errors="replace") as stream:
                        text.append("== %s\n%s" % (name, stream.read()))
    return "\n".join(text)


def check_succeeded(project, result, count):
    assert result.returncode == 0, result.stdout + result.stderr + logs(project)
    assert len(project.successful()) == count
    assert project.failed() == {}


def kill_run(process):
    """SIGKILL a `threadward run` started with project.start()."""
    process.send_signal(signal.SIGKILL)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pass

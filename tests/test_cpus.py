"""Each worker's share of the CPU: the thread-count variables of the numeric
libraries are set to cores / workers unless the user set them;
CPUS_PER_WORKER overrides the share and PIN_CPUS pins each worker to cores
of its own.  (tests/ml checks that PyTorch follows them.)"""

import json
import os

import pytest

from conftest import TASK_IMPORTS_WAIT_FOR, read_until

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "NUMBA_NUM_THREADS")

CORES = sorted(os.sched_getaffinity(0))

RECORD = """
import json, os

def task_method(variables, task_folder, log_file):
    seen = {name: os.environ.get(name) for name in %r}
    seen["cores"] = sorted(os.sched_getaffinity(0))
    seen["worker"] = os.getpid()
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump(seen, stream)
""" % (THREAD_VARIABLES,)

VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3, 4, 5, 6])
"""


@pytest.fixture(autouse=True)
def no_thread_variables(monkeypatch):
    for name in THREAD_VARIABLES + ("SLURM_CPUS_ON_NODE",):
        monkeypatch.delenv(name, raising=False)


def seen_by_tasks(project, resources, env=None):
    project.write(task=RECORD, variables=VARIABLES, resources=resources)
    result = project.run(env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(project.output(str(x), "result.json")) for x in range(1, 7)]


def test_each_worker_gets_its_share_of_the_cores(project):
    share = str(max(1, len(CORES) // 2))
    for seen in seen_by_tasks(project, "NUM_WORKERS = 2\n"):
        assert [seen[name] for name in THREAD_VARIABLES] == [share] * len(THREAD_VARIABLES)
        assert seen["cores"] == CORES   # not pinned unless asked


def test_more_workers_than_cores_get_one_thread_each(project):
    workers = len(CORES) + 2
    for seen in seen_by_tasks(project, "NUM_WORKERS = %d\n" % workers):
        assert seen["OMP_NUM_THREADS"] == "1"


def test_cpus_per_worker_overrides_the_share(project):
    for seen in seen_by_tasks(project, "NUM_WORKERS = 2\nCPUS_PER_WORKER = 3\n"):
        assert seen["OMP_NUM_THREADS"] == seen["MKL_NUM_THREADS"] == "3"


def test_a_variable_the_user_set_is_kept(project):
    share = str(max(1, len(CORES) // 2))
    for seen in seen_by_tasks(project, "NUM_WORKERS = 2\n", env={"OMP_NUM_THREADS": "7"}):
        assert seen["OMP_NUM_THREADS"] == "7"
        assert seen["MKL_NUM_THREADS"] == share


def test_slurm_cpus_on_this_node_bound_the_share(project):
    for seen in seen_by_tasks(project, "NUM_WORKERS = 1\n", env={"SLURM_CPUS_ON_NODE": "1"}):
        assert seen["OMP_NUM_THREADS"] == "1"


@pytest.mark.skipif(len(CORES) < 2, reason="pinning two workers apart needs two cores")
def test_pin_cpus_gives_each_worker_cores_of_its_own(project):
    # Each task waits until both workers hold one, so both are seen.
    project.write(task=TASK_IMPORTS_WAIT_FOR + """
import json, os

def task_method(variables, task_folder, log_file):
    here = os.path.join(os.path.dirname(task_folder), "workers")
    os.makedirs(here, exist_ok=True)
    open(os.path.join(here, str(os.getpid())), "w").close()
    wait_for(lambda: len(os.listdir(here)) >= 2, timeout=120,
             message="both workers to hold a task")
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"cores": sorted(os.sched_getaffinity(0)),
                   "told": os.environ.get("THREADWARD_CPUS")}, stream)
""", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2])
""", resources="NUM_WORKERS = 2\nCPUS_PER_WORKER = 1\nPIN_CPUS = True\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    seen = [json.loads(project.output(x, "result.json")) for x in ("1", "2")]
    assert sorted(task["cores"] for task in seen) == [[CORES[0]], [CORES[1]]]
    assert [task["told"] for task in seen] == [None, None]   # for the worker only


def test_dry_run_and_show_say_the_share(project):
    project.write(variables=VARIABLES,
                  resources="NUM_WORKERS = 2\nCPUS_PER_WORKER = 1\nPIN_CPUS = True\n")
    result = project.run("--dry-run")
    assert result.returncode == 0, result.stderr
    assert "CPU: 1 CPU thread per worker, each pinned to cores of its own" in result.stdout
    assert "worker 0: CUDA_VISIBLE_DEVICES=\"\", cores %d" % CORES[0] in result.stdout
    gate = os.path.join(project.dir, "gate")   # the tasks run until `show` has answered
    project.write(task=TASK_IMPORTS_WAIT_FOR + """
import os
def task_method(variables, task_folder, log_file):
    wait_for(lambda: os.path.exists(%r), timeout=120, message="the test to open the gate")
""" % gate, resources="NUM_WORKERS = 2\n")
    run = project.start()
    try:
        run.stdin.write("show\n")
        run.stdin.flush()
        seen = read_until(run.stdout, "CPUS_PER_WORKER sets it")
    finally:
        open(gate, "w").close()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, seen + out + err
    assert "CPU: %d CPU thread" % max(1, len(CORES) // 2) in seen


@pytest.mark.parametrize("setting, message", [
    ("CPUS_PER_WORKER = 0", "CPUS_PER_WORKER = 0; it must be a whole number >= 1"),
    ("CPUS_PER_WORKER = 1.5", "CPUS_PER_WORKER = 1.5; it must be a whole number >= 1"),
    ("PIN_CPUS = 'yes'", "PIN_CPUS = 'yes'; use True or False"),
    ("PIN_CPUS = True\nLAUNCHER = ['env']", "PIN_CPUS pins workers to cores of this machine"),
])
def test_bad_cpu_settings_are_configuration_errors(project, setting, message):
    project.write(resources="NUM_WORKERS = 1\n" + setting + "\n")
    result = project.run()
    assert result.returncode == 2
    assert message in result.stderr
    assert "resource_constraints.py:2" in result.stderr
    assert not os.path.exists(os.path.join(project.queue, "all_tasks.json"))

"""GPU allocation through the real CLI, with the fake nvidia-smi (tests/fake_bin) on PATH.

Every task writes the CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER it saw into its
task folder; before_each_worker writes the worker's own view into workers/<id>.json.
"""

import json
import os
import re
import types

import pytest

import threadward
from conftest import FAKE_BIN, needs_gputil


def uuid(index):
    """The UUID the fake nvidia-smi gives GPU ``index``."""
    return "GPU-%08d-fake-4000-8000-%012d" % (index, index)


GPU_TASK = """
import json
import os

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project


def _environment():
    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER")}


def before_all_tasks():
    open(os.path.join(HERE, "before_all_tasks.ran"), "w").close()


def before_each_worker(worker_id):
    os.makedirs(os.path.join(HERE, "workers"), exist_ok=True)
    seen = dict(_environment(), worker_id=worker_id)
    with open(os.path.join(HERE, "workers", "%d.json" % worker_id), "w") as stream:
        json.dump(seen, stream)


def task_method(variables, task_folder, log_file):
    with open(os.path.join(task_folder, "environment.json"), "w") as stream:
        json.dump(_environment(), stream)
"""


def variables(count):
    return """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(%d)))
""" % count


def gpu_project(project, resources, tasks=4):
    project.write(task=GPU_TASK, variables=variables(tasks), resources=resources)
    return project


def worker_views(project):
    """{worker id: what its before_each_worker saw}."""
    folder = os.path.join(project.dir, "workers")
    views = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        with open(os.path.join(folder, name)) as stream:
            seen = json.load(stream)
        views[seen["worker_id"]] = seen
    return views


def task_views(project):
    """[what each task saw], one entry per task folder."""
    views = []
    for name in sorted(os.listdir(project.outputs)):
        with open(os.path.join(project.outputs, name, "environment.json")) as stream:
            views.append(json.load(stream))
    return views


def visible(project):
    """Sorted CUDA_VISIBLE_DEVICES of the workers."""
    return sorted(view["CUDA_VISIBLE_DEVICES"] for view in worker_views(project).values())


def assert_ran_fully(project, result, tasks=4):
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(project.successful()) == [str(i) for i in range(tasks)]
    for view in list(worker_views(project).values()) + task_views(project):
        assert view["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    allowed = set(visible(project))
    for view in task_views(project):
        assert view["CUDA_VISIBLE_DEVICES"] in allowed


def assert_nothing_ran(project, result):
    assert result.returncode == 2, result.stdout + result.stderr
    assert project.successful() == [] and project.failed() == {}
    assert not os.path.exists(os.path.join(project.dir, "before_all_tasks.ran"))
    assert worker_views(project) == {}
    assert not os.path.isdir(project.outputs) or not os.listdir(project.outputs)
    assert "Traceback" not in result.stderr


def names_gpus(message, indices):
    """The message lists exactly these GPU numbers, in nvidia-smi order."""
    pattern = r"(?<![\d.])%s(?![\d.])" % r",\s*".join(str(i) for i in indices)
    return re.search(pattern, message) is not None


# -- allocation ---------------------------------------------------------------

@needs_gputil
def test_half_a_gpu_per_worker_puts_two_workers_on_each_gpu(project, fake_gpus):
    fake_gpus(4)
    gpu_project(project, """
NUM_WORKERS = 4
NUM_GPUS_PER_WORKER = 0.5
""", tasks=8)
    result = project.run()
    assert_ran_fully(project, result, tasks=8)
    assert sorted(worker_views(project)) == [0, 1, 2, 3]
    assert visible(project) == ["0", "0", "1", "1"]


@needs_gputil
@pytest.mark.parametrize("fraction, workers, expected", [
    ("1/3", 3, ["0", "0", "0"]),
    ("0.25", 5, ["0", "0", "0", "0", "1"]),
    ("0.3333333333333333", 4, ["0", "0", "0", "1"]),
])
def test_one_over_k_written_as_a_float_is_accepted(project, fake_gpus, fraction, workers,
                                                   expected):
    fake_gpus(2)
    gpu_project(project, "NUM_WORKERS = %d\nNUM_GPUS_PER_WORKER = %s\n" % (workers, fraction))
    result = project.run("--dry-run")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"worker (\d+)\D*CUDA_VISIBLE_DEVICES=(\S*)", result.stdout)
    assert sorted(gpus for _, gpus in listed) == expected


@needs_gputil
def test_two_gpus_per_worker_are_distinct_pairs(project, fake_gpus):
    fake_gpus(4)
    gpu_project(project, """
NUM_WORKERS = 2
NUM_GPUS_PER_WORKER = 2
""")
    result = project.run()
    assert_ran_fully(project, result)
    pairs = [value.split(",") for value in visible(project)]
    assert all(len(pair) == 2 and len(set(pair)) == 2 for pair in pairs)
    assert sorted(pairs[0] + pairs[1]) == ["0", "1", "2", "3"]


def test_zero_gpus_per_worker_hides_every_gpu(project, fake_gpus):
    fake_gpus(4)
    gpu_project(project, """
NUM_WORKERS = 2
NUM_GPUS_PER_WORKER = 0
""")
    result = project.run(env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert_ran_fully(project, result)
    assert visible(project) == ["", ""]
    assert all(view["CUDA_VISIBLE_DEVICES"] == "" for view in task_views(project))


@needs_gputil
@pytest.mark.parametrize("avoid", ['["0", "2"]', '[0, "2"]'])
def test_avoid_gpus_are_never_handed_out(project, fake_gpus, avoid):
    fake_gpus(4)
    gpu_project(project, """
NUM_WORKERS = 2
NUM_GPUS_PER_WORKER = 1
AVOID_GPUS = %s
""" % avoid)
    result = project.run()
    assert_ran_fully(project, result)
    assert visible(project) == ["1", "3"]


@needs_gputil
@pytest.mark.parametrize("include", ['["3", "1"]', "[3, 1]"])
def test_include_gpus_are_the_only_ones_handed_out(project, fake_gpus, include):
    fake_gpus(4)
    gpu_project(project, """
NUM_WORKERS = 2
NUM_GPUS_PER_WORKER = 1
INCLUDE_GPUS = %s
""" % include)
    result = project.run()
    assert_ran_fully(project, result)
    assert visible(project) == ["1", "3"]


@needs_gputil
def test_dry_run_lists_each_workers_gpus_and_the_reserve(project, fake_gpus):
    fake_gpus(4)
    gpu_project(project, """
NUM_WORKERS = 2
NUM_GPUS_PER_WORKER = 1
AVOID_GPUS = ["1"]
""")
    result = project.run("--dry-run")
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"worker (\d+)\D*CUDA_VISIBLE_DEVICES=(\S*)", result.stdout))
    assert sorted(listed) == ["0", "1"]
    assert sorted(listed.values()) == ["0", "2"]
    assert "reserve" in result.stdout
    assert worker_views(project) == {}
    assert project.successful() == []


def test_dry_run_of_a_cpu_sweep_shows_empty_cuda_visible_devices(project):
    gpu_project(project, "NUM_WORKERS = 2\n")
    result = project.run("--dry-run")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"worker (\d+)\D*CUDA_VISIBLE_DEVICES=(\S*)", result.stdout)
    assert [gpus for _, gpus in listed] == ['""', '""']


# -- impossible requests --------------------------------------------------------

IMPOSSIBLE = {
    "not enough GPUs": ("NUM_WORKERS = 5\nNUM_GPUS_PER_WORKER = 1\n", ["5"]),
    "not enough for whole GPUs": ("NUM_WORKERS = 3\nNUM_GPUS_PER_WORKER = 2\n", ["6"]),
    "not enough GPUs after avoiding": (
        "NUM_WORKERS = 3\nNUM_GPUS_PER_WORKER = 1\nAVOID_GPUS = [\"1\", \"2\"]\n", ["1", "2"]),
    "overlap of include and avoid": (
        "NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\n"
        "INCLUDE_GPUS = [\"1\", \"2\"]\nAVOID_GPUS = [2]\n", ["2"]),
    "unknown GPU in INCLUDE_GPUS": (
        "NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\nINCLUDE_GPUS = [\"7\"]\n", ["7"]),
    "unknown GPU in AVOID_GPUS": (
        "NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\nAVOID_GPUS = [9]\n", ["9"]),
    "INCLUDE_GPUS too small": (
        "NUM_WORKERS = 3\nNUM_GPUS_PER_WORKER = 1\nINCLUDE_GPUS = [\"0\", \"1\"]\n", ["3"]),
    "INCLUDE_GPUS too small for shares": (
        "NUM_WORKERS = 3\nNUM_GPUS_PER_WORKER = 0.5\nINCLUDE_GPUS = [\"3\"]\n", ["3"]),
}


@needs_gputil
@pytest.mark.parametrize("case", sorted(IMPOSSIBLE))
def test_impossible_gpu_request_is_an_error_before_anything_runs(project, fake_gpus, case):
    resources, asked = IMPOSSIBLE[case]
    fake_gpus(4)
    gpu_project(project, resources)
    result = project.run()
    assert_nothing_ran(project, result)
    message = result.stderr
    assert "resource_constraints.py" in message
    assert names_gpus(message, range(4)), "the GPUs found are not named: " + message
    for number in asked:
        assert re.search(r"(?<![\d.])%s(?![\d.])" % number, message), message


@pytest.mark.parametrize("fraction", ["0.3", "0.4", "1.5", "0.7"])
def test_fraction_that_is_not_one_over_k_is_an_error(project, fake_gpus, fraction):
    fake_gpus(4)
    gpu_project(project, "NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = %s\n" % fraction)
    result = project.run()
    assert_nothing_ran(project, result)
    assert "NUM_GPUS_PER_WORKER" in result.stderr and fraction in result.stderr
    assert "1/" in result.stderr   # says what would be accepted
    assert "resource_constraints.py:2" in result.stderr


# -- a CUDA_VISIBLE_DEVICES set on the main process (Slurm) ---------------------

@needs_gputil
def test_parent_cuda_visible_devices_numbers_bound_the_choice(project, fake_gpus):
    fake_gpus(4)
    gpu_project(project, "NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 1\n")
    result = project.run(env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert_ran_fully(project, result)
    assert visible(project) == ["2", "3"]


@needs_gputil
def test_parent_cuda_visible_devices_too_small_is_an_error(project, fake_gpus):
    fake_gpus(4)
    gpu_project(project, "NUM_WORKERS = 3\nNUM_GPUS_PER_WORKER = 1\n")
    result = project.run(env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert_nothing_ran(project, result)
    assert "CUDA_VISIBLE_DEVICES" in result.stderr
    assert names_gpus(result.stderr, [2, 3]), result.stderr


@needs_gputil
def test_parent_cuda_visible_devices_uuids_give_workers_uuids(project, fake_gpus):
    fake_gpus(4)
    gpu_project(project, "NUM_WORKERS = 4\nNUM_GPUS_PER_WORKER = 0.5\n")
    result = project.run(env={"CUDA_VISIBLE_DEVICES": "%s,%s" % (uuid(1), uuid(3))})
    assert_ran_fully(project, result)
    assert visible(project) == sorted([uuid(1), uuid(1), uuid(3), uuid(3)])


@needs_gputil
def test_parent_cuda_visible_devices_unknown_uuid_is_an_error(project, fake_gpus):
    fake_gpus(2)
    gpu_project(project, "NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\n")
    result = project.run(env={"CUDA_VISIBLE_DEVICES": uuid(5)})
    assert_nothing_ran(project, result)
    assert uuid(5) in result.stderr


# -- no GPUs to be had ------------------------------------------------------------

@needs_gputil
def test_without_nvidia_smi_a_gpu_sweep_fails_clearly_and_a_cpu_sweep_runs(project, tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    path = {"PATH": str(empty_bin)}   # no nvidia-smi, fake or real
    gpu_project(project, "NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\n")
    result = project.run(env=path)
    assert_nothing_ran(project, result)
    assert "GPU" in result.stderr
    assert "nvidia-smi" in result.stderr, "does not say why no GPU was found: " + result.stderr

    gpu_project(project, "NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 0\n")
    result = project.run(env=path)
    assert_ran_fully(project, result)
    assert visible(project) == ["", ""]


def test_when_gputil_cannot_be_imported_gpu_sweeps_fail_and_cpu_sweeps_run(
        project, fake_gpus, tmp_path):
    fake_gpus(4)
    broken = tmp_path / "broken_gputil"
    broken.mkdir()
    (broken / "GPUtil.py").write_text(
        "raise ImportError(\"No module named 'distutils'\")\n")
    pythonpath = os.pathsep.join([str(broken)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = {"PYTHONPATH": pythonpath}

    gpu_project(project, "NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\n")
    result = project.run(env=env)
    assert_nothing_ran(project, result)
    assert "GPUtil" in result.stderr and "distutils" in result.stderr, result.stderr

    gpu_project(project, "NUM_WORKERS = 2\n")
    result = project.run(env=env)
    assert_ran_fully(project, result)


def test_the_fake_nvidia_smi_is_what_the_tests_use(fake_gpus):
    # A guard for the tests above: they must never see a real GPU machine's GPUs.
    assert os.environ["PATH"].split(os.pathsep)[0] == FAKE_BIN


# -- _plan_gpu_slots, directly -----------------------------------------------------

@pytest.fixture
def plan(tmp_path):
    """plan(found=4, parent=None, **constraints) -> (slots, uuid_by_name)."""
    constraints = tmp_path / "resource_constraints.py"
    constraints.write_text("NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\n")

    def make(found=4, parent=None, num_workers=1, gpus_per_worker=1, workers_per_gpu=1,
             include_gpus=None, avoid_gpus=None):
        project = types.SimpleNamespace(
            num_workers=num_workers, gpus_per_worker=gpus_per_worker,
            workers_per_gpu=workers_per_gpu, include_gpus=include_gpus,
            avoid_gpus=avoid_gpus, constraints_path=str(constraints))
        listed = [(str(i), uuid(i)) for i in range(found)]
        return threadward._plan_gpu_slots(project, listed, parent)
    return make


def test_plan_shares_and_keeps_the_rest_in_reserve(plan):
    slots, uuids = plan(num_workers=4, workers_per_gpu=2)
    assert slots[:4] == [("0",), ("0",), ("1",), ("1",)]
    assert sorted(slots) == sorted([(str(i),) for i in range(4)] * 2)
    assert uuids["0"] == uuid(0) and uuids["3"] == uuid(3)


def test_plan_whole_gpus(plan):
    slots, _ = plan(num_workers=2, gpus_per_worker=2)
    assert slots == [("0", "1"), ("2", "3")]
    slots, _ = plan(num_workers=1, gpus_per_worker=3)
    assert slots == [("0", "1", "2")]


def test_plan_include_and_avoid(plan):
    slots, _ = plan(num_workers=2, include_gpus=["3", "1"])
    assert sorted(slots) == [("1",), ("3",)]
    slots, _ = plan(num_workers=2, avoid_gpus=["0", "1"])
    assert sorted(slots) == [("2",), ("3",)]


def test_plan_parent_numbers_and_uuids(plan):
    slots, _ = plan(num_workers=2, parent="3,1")
    assert sorted(slots) == [("1",), ("3",)]
    slots, uuids = plan(num_workers=2, parent="%s,%s" % (uuid(2), uuid(0)))
    assert sorted(slots) == sorted([(uuid(0),), (uuid(2),)])
    assert uuids[uuid(2)] == uuid(2)
    slots, _ = plan(num_workers=1, parent="2,3", include_gpus=["3"])
    assert slots == [("3",)]


@pytest.mark.parametrize("kwargs, asked", [
    (dict(num_workers=5), "5"),
    (dict(num_workers=3, workers_per_gpu=2, include_gpus=["0"]), "2"),
    (dict(include_gpus=["4"]), "4"),
    (dict(avoid_gpus=["12"]), "12"),
    (dict(num_workers=3, parent="0,1"), "3"),
    (dict(parent="0,6"), "6"),
    (dict(parent=""), "1"),
    (dict(parent="1", include_gpus=["2"]), "2"),
])
def test_plan_impossible_requests(plan, kwargs, asked):
    with pytest.raises(threadward.ConfigError) as caught:
        plan(**kwargs)
    message = str(caught.value)
    assert names_gpus(message, range(4)), message
    assert re.search(r"(?<![\d.])%s(?![\d.])" % asked, message), message


def test_plan_with_no_gpus_found(plan):
    with pytest.raises(threadward.ConfigError) as caught:
        plan(found=0)
    assert "none" in str(caught.value)

"""What a converter loads keeps the processes it owns while the value is
kept, and loses them (ended, not left behind) when the value changes.

One worker, so the order of the tasks is the order of the variables: all of
the first value's tasks, then all of the second's.
"""

from workloads import alive, check_succeeded, logs, need_libraries, results

need_libraries()

ONE_WORKER = "NUM_WORKERS = 1\n"

# Each task writes what it saw: the PIDs it was given and the worker's children.
RECORD = """
import json, os, psutil

def record(task_folder, **seen):
    seen["children"] = sorted(p.pid for p in psutil.Process().children())
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump(seen, stream)
"""

TWO_VALUES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="%s", values=["a", "b"])
    variable_set.add_variable(name="seed", values=[0, 1, 2])
"""


def by_value(project):
    """{value: [result of each of its tasks]} (tasks are "a/0", "b/2", ...)."""
    grouped = {}
    for task_id, seen in sorted(results(project).items()):
        grouped.setdefault(task_id.split("/")[0], []).append(seen)
    return grouped


def check_kept_then_ended(project, key):
    """The processes under ``key`` are the same for every task of a value,
    differ between values, and those of "a" were gone when "b" ran."""
    grouped = by_value(project)
    assert sorted(grouped) == ["a", "b"] and all(len(v) == 3 for v in grouped.values())
    pids = {}
    for value, seen in grouped.items():
        assert all(s[key] == seen[0][key] for s in seen), (value, seen)
        pids[value] = set(seen[0][key])
        assert pids[value]
    assert not pids["a"] & pids["b"]
    for seen in grouped["b"]:
        assert not pids["a"] & set(seen["children"]), "a's processes outlived its value"
    for pid in pids["a"] | pids["b"]:
        assert not alive(pid), "process %d outlived the run" % pid


def test_model_with_a_persistent_dataloader_is_kept_until_the_model_changes(project):
    project.write(resources=ONE_WORKER, variables=TWO_VALUES % "model" + """
import torch
from torch.utils.data import DataLoader, TensorDataset

def model_to_value(string_value, nickname):
    torch.manual_seed(0)
    width = 4 if string_value == "a" else 16
    net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, 1))
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    loader = DataLoader(data, batch_size=16, num_workers=2, persistent_workers=True)
    return {"net": net, "loader": loader}
""", task=RECORD + """
import torch
TASK_TIMEOUT = 120   # before: the second task of a model hung for good

def task_method(variables, task_folder, log_file):
    net, loader = variables["model"]["net"], variables["model"]["loader"]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for epoch in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
    record(task_folder, loader=sorted(w.pid for w in loader._iterator._workers),
           net=id(net))
""")
    result = project.run(timeout=600)
    check_succeeded(project, result, 6)
    check_kept_then_ended(project, "loader")
    grouped = by_value(project)
    assert len({s["net"] for s in grouped["a"]}) == 1   # the same model object each time


def test_server_process_made_by_a_converter_lives_as_long_as_its_value(project):
    project.write(resources=ONE_WORKER, variables=TWO_VALUES % "server" + """
import subprocess, sys

ECHO = "import sys\\nfor line in sys.stdin:\\n    sys.stdout.write(line.upper())\\n    sys.stdout.flush()"

def server_to_value(string_value, nickname):
    return subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, universal_newlines=True)
""", task=RECORD + """
def task_method(variables, task_folder, log_file):
    server = variables["server"]
    assert server.poll() is None, "the server has exited: %s" % server.poll()
    server.stdin.write("hello %s\\n" % variables["seed"])
    server.stdin.flush()
    assert server.stdout.readline() == "HELLO %s\\n" % variables["seed"]
    record(task_folder, server=[server.pid])
""")
    result = project.run(timeout=300)
    check_succeeded(project, result, 6)
    check_kept_then_ended(project, "server")


def test_multiprocessing_pool_made_by_a_converter_is_kept_then_ended(project):
    project.write(resources=ONE_WORKER, variables=TWO_VALUES % "pool" + """
import multiprocessing

def pool_to_value(string_value, nickname):
    return multiprocessing.get_context("fork").Pool(2)
""", task=RECORD + """
TASK_TIMEOUT = 120

def square(x):
    return x * x

def task_method(variables, task_folder, log_file):
    pool = variables["pool"]
    assert pool.map(square, range(20)) == [x * x for x in range(20)]
    record(task_folder, pool=sorted(p.pid for p in pool._pool))
""")
    result = project.run(timeout=300)
    check_succeeded(project, result, 6)
    check_kept_then_ended(project, "pool")
    assert "Traceback" not in logs(project)


def test_pool_kept_in_a_module_global_is_reused_and_ends_with_the_worker(project):
    project.write(resources=ONE_WORKER, variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3, 4])
""", task=RECORD + """
import concurrent.futures, multiprocessing
TASK_TIMEOUT = 120
POOL = EXECUTOR = None

def cube(x):
    return x ** 3

def task_method(variables, task_folder, log_file):
    global POOL, EXECUTOR
    if POOL is None:
        POOL = multiprocessing.Pool(2)
        EXECUTOR = concurrent.futures.ProcessPoolExecutor(2)
    assert POOL.map(cube, [variables["x"]] * 4) == [variables["x"] ** 3] * 4
    assert list(EXECUTOR.map(cube, range(4))) == [0, 1, 8, 27]
    record(task_folder, pool=sorted(p.pid for p in POOL._pool),
           executor=sorted(EXECUTOR._processes))
""")
    result = project.run(timeout=300)
    check_succeeded(project, result, 4)
    seen = list(results(project).values())
    for key in ("pool", "executor"):
        assert len(seen[0][key]) == 2
        assert all(s[key] == seen[0][key] for s in seen), seen   # reused, not relaunched
        assert not any(alive(pid) for pid in seen[0][key])        # ended with the worker
    assert "Traceback" not in logs(project)


def test_joblib_and_sklearn_n_jobs_reuse_one_pool_across_tasks(project):
    project.write(resources=ONE_WORKER, variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="seed", values=[0, 1, 2, 3])
""", task=RECORD + """
from joblib import Parallel, delayed
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
TASK_TIMEOUT = 120

def task_method(variables, task_folder, log_file):
    X, y = make_classification(n_samples=300, random_state=variables["seed"])
    scores = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=4, n_jobs=2)
    assert 0.5 < scores.mean() <= 1.0
    pids = Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(16))
    record(task_folder, loky=sorted(set(pids)))
""")
    result = project.run(timeout=600)
    check_succeeded(project, result, 4)
    used = set()
    for seen in results(project).values():
        used.update(seen["loky"])
    # Relaunched after every task, the pool would show new PIDs each time.
    assert 1 <= len(used) <= 2, used
    text = logs(project)
    for sign in ("Traceback", "resource_tracker", "KeyError", "leaked"):
        assert sign not in text, text
    assert not any(alive(pid) for pid in used)


def test_a_value_whose_processes_never_die_does_not_hold_up_the_next_one(project):
    """A converter's process that ignores SIGTERM is killed when its value goes."""
    project.write(resources=ONE_WORKER, variables=TWO_VALUES % "server" + """
import subprocess, sys

STUBBORN = "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(600)"

def server_to_value(string_value, nickname):
    return subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=True)
""", task=RECORD + """
def task_method(variables, task_folder, log_file):
    assert variables["server"].poll() is None, "the value's process was ended"
    record(task_folder, server=[variables["server"].pid])
""")
    result = project.run(timeout=300)
    check_succeeded(project, result, 6)
    check_kept_then_ended(project, "server")

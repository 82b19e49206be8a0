"""Processes a task starts: spawned children import the project files,
forked ones inherit nothing of the worker's, strays are ended on every exit
path, and a stop ends the run within a bounded time whatever they do."""

import os
import signal
import time

import pytest

from conftest import assert_no_processes_left, read_until, wait_for
from workloads import alive, check_succeeded, kill_run, logs, need_libraries, results

need_libraries()


def test_functions_of_the_project_files_work_in_spawned_children(project):
    # The task file imports nothing heavy at its top: every spawned child imports it.
    project.write(resources="NUM_WORKERS = 2\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="kind", values=["spawn", "forkserver", "joblib",
                                                   "dataloader", "executor"])
""", task="""
import json, os
TASK_TIMEOUT = 180   # before: a hang here, or ModuleNotFoundError in the children

def square(x):
    return x * x

class Squares:
    \"\"\"A map-style dataset defined in the project file.\"\"\"
    def __len__(self):
        return 8
    def __getitem__(self, index):
        return square(index)

def task_method(variables, task_folder, log_file):
    kind = variables["kind"]
    expected = [x * x for x in range(8)]
    if kind in ("spawn", "forkserver"):
        import multiprocessing
        with multiprocessing.get_context(kind).Pool(2) as pool:
            got = pool.map(square, range(8))
    elif kind == "joblib":
        from joblib import Parallel, delayed
        got = Parallel(n_jobs=2)(delayed(square)(x) for x in range(8))
    elif kind == "executor":
        import concurrent.futures, multiprocessing
        with concurrent.futures.ProcessPoolExecutor(
                2, mp_context=multiprocessing.get_context("spawn")) as executor:
            got = list(executor.map(square, range(8)))
    else:
        import torch.utils.data
        loader = torch.utils.data.DataLoader(Squares(), batch_size=4, num_workers=2,
                                             multiprocessing_context="spawn")
        got = [int(x) for batch in loader for x in batch]
    assert got == expected, got
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"kind": kind}, stream)
""")
    result = project.run(timeout=600)
    check_succeeded(project, result, 5)
    assert "ModuleNotFoundError" not in logs(project)


def test_processes_forked_by_a_task_inherit_no_handler_and_no_channel(project):
    project.write(resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3])
""", task="""
import json, multiprocessing, os, signal

def square(x):
    return x * x

def pipes(pid="self"):
    \"\"\"The pipes a process holds open.\"\"\"
    found = set()
    for fd in os.listdir("/proc/%s/fd" % pid):
        try:
            target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found

def task_method(variables, task_folder, log_file):
    # A fork pool ended by terminate() (what `with` does): its children get SIGTERM.
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
    # The protocol channel: the pipes the worker shares with the main process,
    # but for the main process's own stdin, stdout and stderr.
    main = pipes(os.getppid())
    channel = pipes() & main - {os.readlink("/proc/%d/fd/%d" % (os.getppid(), fd))
                                for fd in (0, 1, 2)}
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        seen = {"handler": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                "pipes": sorted(pipes())}
        os.write(write_end, json.dumps(seen).encode())
        os._exit(0)
    os.close(write_end)
    seen = json.loads(os.read(read_end, 65536).decode())
    os.waitpid(child, 0)
    seen["channel"], seen["main"] = sorted(channel), sorted(main)
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump(seen, stream)
""")
    result = project.run(timeout=300)
    check_succeeded(project, result, 3)
    for seen in results(project).values():
        assert seen["handler"], "a forked child kept the worker's SIGTERM handler"
        assert len(seen["channel"]) == 2, seen     # its stdin and stdout
        # Nothing that keeps a pipe of the main process open, the console included.
        assert not set(seen["pipes"]) & set(seen["main"]), seen
    text = logs(project)
    assert "_Terminated" not in text and "Traceback" not in text, text


STRAYS = """
import json, os, subprocess, sys, time
TASK_TIMEOUT = %s

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

def task_method(variables, task_folder, log_file):
    # Children in sessions of their own, that ignore SIGTERM, and a double fork.
    own = subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=True)
    daemon = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', %%r], "
        "start_new_session=True, stdout=subprocess.DEVNULL); print(p.pid)" %% STUBBORN],
        stdout=subprocess.PIPE, universal_newlines=True)
    orphan = int(daemon.communicate()[0])
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"pids": [own.pid, orphan]}, stream)
    %s
"""


def stray_pids(project):
    return [pid for seen in results(project).values() for pid in seen["pids"]]


def test_strays_of_a_task_are_ended_when_it_returns(project):
    project.write(resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2])
""", task=STRAYS % ("None", "return"))
    result = project.run(timeout=300)
    check_succeeded(project, result, 2)
    assert len(stray_pids(project)) == 4
    assert not any(alive(pid) for pid in stray_pids(project))


def test_strays_of_a_timed_out_task_that_ignores_sigterm_are_ended(project):
    project.write(resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1])
""", task=(STRAYS % ("3", "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"))
        .replace("import json,", "import json, signal,"))
    result = project.run(timeout=300)
    assert result.returncode == 1
    assert project.failed() == {"1": "timeout"}
    pids = stray_pids(project)
    assert len(pids) == 2
    wait_for(lambda: not any(alive(pid) for pid in pids),
             message="the processes %s to end" % pids)


def test_strays_of_a_worker_that_crashes_are_ended(project):
    """The worker dies with its task (a segfault, os._exit): the processes the
    task left come to the main process, which ends them."""
    project.write(resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2])
""", task=STRAYS % ("None", "if variables['x'] == 1: os._exit(9)"))
    result = project.run(timeout=300)
    assert result.returncode == 1
    assert project.failed() == {"1": "worker 0 exited with code 9"}
    assert project.successful() == ["2"]
    pids = stray_pids(project)
    assert len(pids) == 4
    wait_for(lambda: not any(alive(pid) for pid in pids),
             message="the processes %s to end" % pids)


def test_main_process_killed_leaves_no_stray_and_no_pool(project):
    project.write(resources="NUM_WORKERS = 1\n", variables="""
import multiprocessing

def setup_variable_set(variable_set):
    variable_set.add_variable(name="pool", values=["p"])
    variable_set.add_variable(name="x", values=[1, 2])

def pool_to_value(string_value, nickname):
    return multiprocessing.Pool(2)
""", task=STRAYS % ("None", """with open(os.path.join(task_folder, "pool.json"), "w") as stream:
        json.dump([p.pid for p in variables["pool"]._pool], stream)
    time.sleep(600)"""))
    run = project.start()
    pool_file = os.path.join(project.outputs, "p", "1", "pool.json")
    wait_for(lambda: os.path.exists(pool_file) and os.path.getsize(pool_file), timeout=120)
    with open(pool_file) as stream:
        pids = stray_pids(project) + __import__("json").load(stream)
    assert len(pids) == 4
    kill_run(run)
    wait_for(lambda: not any(alive(pid) for pid in pids),
             message="the processes %s to end" % pids)
    assert_no_processes_left(project.dir)


def stop_and_time(project, run, signals, started_file):
    """Send ``signals`` to a run once ``started_file`` exists; the seconds until it ends.
    A Ctrl-C followed by another is sent only once the run has said it saw
    it (two pending SIGINTs would merge into one)."""
    wait_for(lambda: os.path.exists(started_file), timeout=120,
             message="%s to be created" % started_file)
    began = time.monotonic()
    for number, signum in enumerate(signals):
        run.send_signal(signum)
        if signum == signal.SIGINT and number + 1 < len(signals):
            read_until(run.stdout, "press Ctrl-C again")
    run.communicate(timeout=120)
    return time.monotonic() - began


def test_a_task_waiting_on_a_broken_pool_is_ended_after_the_grace(project):
    """A pool whose worker died mid-map waits for good: SIGTERM still ends the run."""
    project.write(resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2])
""", task="""
import multiprocessing, os, signal, time
SIGTERM_GRACE = 1

def nap(x):
    time.sleep(600)

def task_method(variables, task_folder, log_file):
    pool = multiprocessing.Pool(2)
    waiting = pool.map_async(nap, range(4))
    time.sleep(0.5)
    os.kill(pool._pool[0].pid, signal.SIGKILL)
    open(os.path.join(task_folder, "started"), "w").close()
    waiting.get()
""")
    run = project.start()
    seconds = stop_and_time(project, run, [signal.SIGTERM],
                            os.path.join(project.outputs, "1", "started"))
    assert run.returncode == 1
    assert project.failed() == {"1": "interrupted"}
    # Grace (1 s) + SIGTERM to SIGKILL (5 s) + the exit: well under a minute.
    assert seconds < 60, seconds
    assert_no_processes_left(project.dir)


def test_a_hung_converter_that_ignores_sigterm_is_ended_by_a_second_ctrl_c(project):
    project.write(resources="NUM_WORKERS = 1\n", variables="""
import os, signal, time

def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["m"])
    variable_set.add_variable(name="x", values=[1, 2])

def model_to_value(string_value, nickname):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(os.environ["STARTED_FILE"]), "w").close()
    time.sleep(600)
""", task="""
def task_method(variables, task_folder, log_file):
    pass
""")
    started = os.path.join(project.dir, "converter.started")
    run = project.start(env={"STARTED_FILE": started})
    seconds = stop_and_time(project, run, [signal.SIGINT, signal.SIGINT], started)
    assert run.returncode == 1
    assert project.failed() == {"m/1": "interrupted"}
    assert seconds < 60, seconds
    assert_no_processes_left(project.dir)


@pytest.mark.parametrize("started_by", ["task_method", "before_each_worker"])
def test_a_worker_whose_exit_joins_a_process_for_good_still_ends(project, started_by):
    """multiprocessing joins non-daemon processes at exit; one that never ends
    would keep the worker, and so the run, alive for good."""
    project.write(resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1])
""", task="""
import json, multiprocessing, os, time
KEPT = None

def start():
    global KEPT
    KEPT = multiprocessing.Process(target=time.sleep, args=(600,))
    KEPT.start()

def before_each_worker(worker_id):
    if %r == "before_each_worker":
        start()

def task_method(variables, task_folder, log_file):
    if KEPT is None:
        start()
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"pids": [KEPT.pid]}, stream)
""" % started_by)
    result = project.run(timeout=120)
    check_succeeded(project, result, 1)
    assert not alive(stray_pids(project)[0])


def test_threads_of_each_worker_are_its_share_of_the_cores(project, monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    project.write(resources="NUM_WORKERS = 2\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3, 4])
""", task="""
import json, os, torch

def task_method(variables, task_folder, log_file):
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"torch": torch.get_num_threads(),
                   "omp": os.environ["OMP_NUM_THREADS"]}, stream)
""")
    result = project.run(timeout=300)
    check_succeeded(project, result, 4)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for seen in results(project).values():
        assert seen == {"torch": share, "omp": str(share)}, seen


def test_cuda_variables_and_torch_agree_in_a_cpu_sweep(project):
    """No GPU asked for: the worker sees none, and torch agrees."""
    project.write(resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1])
""", task="""
import json, os, torch

def task_method(variables, task_folder, log_file):
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"visible": os.environ["CUDA_VISIBLE_DEVICES"],
                   "cuda": torch.cuda.is_available()}, stream)
""")
    result = project.run(timeout=300)
    check_succeeded(project, result, 1)
    assert results(project)["1"] == {"visible": "", "cuda": False}


def test_a_tqdm_progress_bar_goes_to_the_task_log(project):
    project.write(resources="NUM_WORKERS = 2\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2])
""", task="""
from tqdm import tqdm

def task_method(variables, task_folder, log_file):
    for _ in tqdm(range(50), desc="epoch %d" % variables["x"]):
        pass
""")
    result = project.run(timeout=120)
    check_succeeded(project, result, 2)
    assert "epoch" not in result.stdout + result.stderr   # nothing on the console
    for x in (1, 2):
        log = project.log(str(x))
        assert "epoch %d: 100%%" % x in log and "50/50" in log, log


def test_a_fork_of_a_fork_works(project):
    """The worker's at-fork clean-up runs in its own children only: in theirs
    the same fd numbers are their own pipes."""
    project.write(resources="NUM_WORKERS = 1\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2])
""", task="""
import multiprocessing, sys

def leaf():
    pass

def middle():
    inner = multiprocessing.get_context("fork").Process(target=leaf)
    inner.start()
    inner.join()
    sys.exit(inner.exitcode)

def task_method(variables, task_folder, log_file):
    outer = multiprocessing.get_context("fork").Process(target=middle)
    outer.start()
    outer.join()
    assert outer.exitcode == 0, outer.exitcode
""")
    result = project.run(timeout=120)
    check_succeeded(project, result, 2)


def test_a_background_server_a_converter_starts_through_a_shell_is_kept(project):
    project.write(resources="NUM_WORKERS = 1\n", variables="""
import subprocess

def setup_variable_set(variable_set):
    variable_set.add_variable(name="server", values=["a", "b"])
    variable_set.add_variable(name="x", values=[1, 2])

def server_to_value(string_value, nickname):
    shell = subprocess.Popen("sleep 300 & echo $!", shell=True, stdout=subprocess.PIPE,
                             universal_newlines=True)
    return int(shell.stdout.readline())   # the shell may still be there, or gone
""", task="""
import json, os

def task_method(variables, task_folder, log_file):
    os.kill(variables["server"], 0)   # still running
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"pids": [variables["server"]]}, stream)
""")
    result = project.run(timeout=120)
    check_succeeded(project, result, 4)
    seen = results(project)
    assert seen["a/1"] == seen["a/2"] and seen["b/1"] == seen["b/2"]
    wait_for(lambda: not any(alive(pid) for pid in stray_pids(project)))

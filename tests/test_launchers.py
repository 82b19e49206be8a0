"""Worker launchers (LAUNCHER = "slurm" | "ssh" | a command prefix) against the
real programs: a single-node Slurm cluster with 2 fake GPUs and an sshd on
127.0.0.1, both brought up by .ci/cluster-up (which .ci/run calls).

The tests that need them read the environment that cluster-up's env.sh sets:

    THREADWARD_TEST_SLURM=1    and SLURM_CONF: the cluster answers srun
    THREADWARD_TEST_SSH="..."  ssh options (shell words) that log in to
                               127.0.0.1 as the current user with no prompt

and are skipped, with the reason in pytest's summary, where they are unset.
The custom-command launcher, the configuration errors and the dead-host case
need neither and always run.  No traffic leaves 127.0.0.1.

Every task records what it saw (environment, working directory, host) in
seen.json in its task folder, marks itself started, and waits (bounded) until
a second task has started too, so every test sees two workers at work at
once.  A test that creates DIR/hold keeps the tasks running until it creates
DIR/release (or until they are killed).
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess

import pytest

from conftest import TASK_IMPORTS_WAIT_FOR, needs_gputil, processes_of, wait_for

SLURM = os.environ.get("THREADWARD_TEST_SLURM") == "1" and bool(os.environ.get("SLURM_CONF"))
SSH_OPTIONS = shlex.split(os.environ.get("THREADWARD_TEST_SSH", ""))
HOST = socket.gethostname().split(".")[0]

needs_slurm = pytest.mark.skipif(
    not SLURM, reason="no Slurm cluster here: run .ci/cluster-up (then source its env.sh)")
needs_sshd = pytest.mark.skipif(
    not SSH_OPTIONS, reason="no sshd on 127.0.0.1 here: run .ci/cluster-up (then source its "
    "env.sh)")
needs_ssh_client = pytest.mark.skipif(shutil.which("ssh") is None,
                                      reason="no ssh client here: run .ci/cluster-up")

SEEN = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_STEP_GPUS",
        "TW_LAUNCHED", "TW_GPUS")

TASK = TASK_IMPORTS_WAIT_FOR + """
import json, os, socket
import mylib   # the project's own code: workers run in the project, with it on sys.path

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def task_method(variables, task_folder, log_file):
    seen = dict((name, os.environ.get(name)) for name in %r)
    seen.update(cwd=os.getcwd(), pid=os.getpid(), host=socket.gethostname(), mylib=mylib.VALUE)
    with open(os.path.join(task_folder, "seen.json"), "w") as stream:
        json.dump(seen, stream)
    started = os.path.join(HERE, "started")
    os.makedirs(started, exist_ok=True)
    open(os.path.join(started, str(variables["x"])), "w").close()
    wait_for(lambda: len(os.listdir(started)) >= 2, timeout=120,
             message="a second task to start")
    if os.path.exists(os.path.join(HERE, "hold")):
        wait_for(lambda: os.path.exists(os.path.join(HERE, "release")), timeout=300,
                 message="the test to create DIR/release")
""" % (SEEN,)


def variables(count):
    return """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=list(range(%d)))
""" % count


def sweep(project, resources, tasks=4, hold=False):
    """Write the recording task, ``tasks`` tasks and the given resource settings."""
    project.write(task=TASK, variables=variables(tasks), resources=resources)
    with open(os.path.join(project.dir, "mylib.py"), "w") as stream:
        stream.write("VALUE = 42\n")
    if hold:
        open(os.path.join(project.dir, "hold"), "w").close()


def seen(project):
    """{task id: what the task saw} for every task that recorded it."""
    found = {}
    for task in project.all_tasks():
        path = os.path.join(project.outputs, *(task["task_id"].split("/") + ["seen.json"]))
        if os.path.exists(path):
            with open(path) as stream:
                found[task["task_id"]] = json.load(stream)
    return found


def started(project):
    folder = os.path.join(project.dir, "started")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def report(result):
    return "exit %s\n--- stdout\n%s\n--- stderr\n%s" % (
        result.returncode, result.stdout, result.stderr)


def ssh_resources(options, hosts='["127.0.0.1"]', workers=2):
    return "LAUNCHER = \"ssh\"\nNUM_WORKERS = %d\nHOSTS = %s\nSSH_OPTIONS = %r\n" % (
        workers, hosts, list(options))


# -- Slurm helpers --------------------------------------------------------------

def slurm(*argv, **kwargs):
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=kwargs.pop("timeout", 30), **kwargs)


def live_jobs_and_steps(job_ids):
    """Jobs (any state squeue still lists) and steps of ``job_ids``."""
    jobs = slurm("squeue", "-h", "-o", "%i %T").stdout.split("\n")
    steps = slurm("squeue", "-s", "-h", "-o", "%i").stdout.split()
    live = [line for line in jobs if line.split(" ")[0] in job_ids]
    return live + [step for step in steps if step.split(".")[0] in job_ids]


@pytest.fixture(autouse=True)
def outside_any_allocation(monkeypatch):
    """Tests start outside an allocation even when pytest runs inside one."""
    for name in list(os.environ):
        if name.startswith("SLURM_") and name != "SLURM_CONF":
            monkeypatch.delenv(name)


@pytest.fixture
def cluster():
    """After the test, cancel whatever it left on the cluster (a failed test
    must not leave steps that make the next one wait for CPUs)."""
    yield
    if not SLURM:
        return
    listed = slurm("squeue", "-h", "-o", "%i %j").stdout.split("\n")
    ours = [line.split(" ")[0] for line in listed
            if line.split(" ")[-1].startswith(("threadward", "tw-test"))]
    if ours:
        slurm("scancel", *ours)


# -- a command prefix: needs no cluster -------------------------------------------

def test_command_prefix_launcher_runs_each_worker_through_it(project):
    sweep(project, 'LAUNCHER = ["env", "TW_LAUNCHED={worker_id}", "TW_GPUS={gpus}"]\n'
                   'NUM_WORKERS = 2\n')
    result = project.run()
    assert result.returncode == 0, report(result)
    records = seen(project)
    assert sorted(project.successful()) == ["0", "1", "2", "3"] == sorted(records)
    assert set(r["TW_LAUNCHED"] for r in records.values()) == {"0", "1"}
    assert all(r["TW_GPUS"] == "" for r in records.values())
    assert all(r["cwd"] == project.dir and r["mylib"] == 42 for r in records.values())


@needs_gputil
def test_command_prefix_launcher_gets_each_workers_gpus(project, fake_gpus):
    fake_gpus(2)
    sweep(project, 'LAUNCHER = ["env", "TW_LAUNCHED={worker_id}", "TW_GPUS={gpus}"]\n'
                   'NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 1\n')
    result = project.run()
    assert result.returncode == 0, report(result)
    records = seen(project).values()
    assert set((r["TW_LAUNCHED"], r["TW_GPUS"]) for r in records) in (
        {("0", "0"), ("1", "1")}, {("0", "1"), ("1", "0")})
    assert all(r["TW_GPUS"] == r["CUDA_VISIBLE_DEVICES"] for r in records)


# -- configuration errors and dead hosts: need no cluster --------------------------

def test_fractional_gpus_with_slurm_are_a_configuration_error(project):
    sweep(project, 'LAUNCHER = "slurm"\nNUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 0.5\n')
    result = project.run()
    assert result.returncode == 2, report(result)
    assert "NUM_GPUS_PER_WORKER" in result.stderr
    assert "resource_constraints.py" in result.stderr
    assert not os.path.exists(os.path.join(project.dir, "started"))


@needs_ssh_client
def test_host_that_does_not_answer_fails_clearly_with_sshs_message(project):
    with socket.socket() as probe:       # a port on 127.0.0.1 where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sweep(project, ssh_resources(["-p", str(port), "-o", "BatchMode=yes",
                                  "-o", "StrictHostKeyChecking=no",
                                  "-o", "UserKnownHostsFile=/dev/null",
                                  "-o", "ConnectTimeout=5"]))
    result = project.run(timeout=180)
    assert result.returncode == 1, report(result)
    output = result.stdout + result.stderr
    assert "Connection refused" in output, report(result)   # ssh's own stderr, passed on
    assert "127.0.0.1" in output
    assert project.successful() == [] and started(project) == []


# -- Slurm ------------------------------------------------------------------------------

@needs_slurm
def test_slurm_inside_an_allocation_gives_each_worker_its_own_gpu(project, cluster):
    sweep(project, 'LAUNCHER = "slurm"\nNUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 1\n', tasks=2)
    # -n2: the allocation needs a CPU per concurrent step (each step is --exact).
    result = subprocess.run(
        ["salloc", "-N1", "-n2", "--gres=gpu:2", "--job-name=tw-test"] + project.command(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120, env=project.env())
    assert result.returncode == 0, report(result)
    records = list(seen(project).values())
    assert len(records) == 2 and sorted(project.successful()) == ["0", "1"]
    assert len(set(r["SLURM_JOB_ID"] for r in records)) == 1      # salloc's job
    assert None not in [r["SLURM_STEP_ID"] for r in records]
    assert len(set(r["SLURM_STEP_ID"] for r in records)) == 2     # one step per worker
    gpus = [r["CUDA_VISIBLE_DEVICES"] for r in records]
    assert sorted(gpus) == ["0", "1"], records                   # chosen by Slurm
    assert sorted(r["SLURM_STEP_GPUS"] for r in records) == ["0", "1"], records


@needs_slurm
def test_slurm_outside_an_allocation_and_show_lists_the_host(project, cluster):
    sweep(project, 'LAUNCHER = "slurm"\nNUM_WORKERS = 2\n', hold=True)
    process = project.start()
    status_file = os.path.join(project.queue, "status.json")
    row = re.compile(r"^\s*(\d+)\s+(\d+)@(\S+)\s.*busy.*\s(\d[\d.]*[BKMG])/")

    def table_with_two_remote_busy_workers():
        try:
            with open(status_file) as stream:
                text = json.load(stream)["show"]
        except (OSError, ValueError, KeyError):
            return None
        rows = [row.match(line) for line in text.splitlines()]
        rows = [match for match in rows if match]
        return text if len(rows) == 2 and all(m.group(3) == HOST for m in rows) else None
    try:
        table = wait_for(table_with_two_remote_busy_workers, timeout=60, interval=0.2)
        print(table)        # the show table of a Slurm run (pytest -s shows it)
        assert "PID@host" in table
        open(os.path.join(project.dir, "release"), "w").close()
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, out + err
    records = seen(project)
    assert sorted(project.successful()) == ["0", "1", "2", "3"] == sorted(records)
    jobs = set(r["SLURM_JOB_ID"] for r in records.values())
    assert None not in jobs and len(jobs) == 2        # each worker is its own job
    assert all(r["cwd"] == project.dir and r["mylib"] == 42 for r in records.values())


@needs_slurm
def test_slurm_step_that_cannot_start_is_reported_with_sruns_message(project, cluster):
    sweep(project, 'LAUNCHER = "slurm"\nNUM_WORKERS = 2\n'
                   'SLURM_OPTIONS = ["--partition=no-such-partition"]\n')
    result = project.run(timeout=180)
    assert result.returncode == 1, report(result)
    assert "invalid partition" in (result.stdout + result.stderr).lower(), report(result)
    assert project.successful() == [] and started(project) == []


@needs_slurm
@pytest.mark.parametrize("how", ["batch", "every step"])
def test_sigterm_to_an_sbatch_job_then_a_rerun_completes_every_task_once(project, cluster, how):
    """`batch`: `scancel -s TERM --full` (in 22.05 it reaches the batch script's
    process tree but not the steps threadward started in their own sessions):
    threadward stops, gives running tasks SIGTERM_GRACE, then ends and records
    them as interrupted.  `every step`: as on preemption or at the time limit,
    every step gets SIGTERM, the workers' steps and the batch script alike."""
    sweep(project, 'LAUNCHER = "slurm"\nNUM_WORKERS = 2\n', hold=True)
    with open(os.path.join(project.config, "task_specification.py"), "a") as stream:
        stream.write("\nSIGTERM_GRACE = 2\n")
    script = os.path.join(project.dir, "job.sh")
    with open(script, "w") as stream:
        stream.write("#!/bin/bash\nexec %s\n" % " ".join(
            shlex.quote(part) for part in project.command()))
    log = os.path.join(project.dir, "job.out")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "-N1", "-n2", "--job-name=tw-test", "-o", log, script],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=30, env=project.env())
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]

    def job_output():
        return open(log).read() if os.path.exists(log) else "(no %s)" % log
    wait_for(lambda: len(started(project)) == 2, timeout=60)
    running = started(project)
    if how == "batch":
        assert slurm("scancel", "-s", "TERM", "--full", job).returncode == 0
    else:
        assert slurm("scancel", "-s", "TERM", job).returncode == 0
        assert slurm("scancel", "-s", "TERM", "--batch", job).returncode == 0
    try:
        wait_for(lambda: not live_jobs_and_steps([job]), timeout=60, interval=0.2)
    except AssertionError:
        raise AssertionError("job %s still there after SIGTERM: %s\n%s" % (
            job, live_jobs_and_steps([job]), job_output()))
    first = project.successful()
    assert len(first) == len(set(first)), job_output()
    assert not set(running) & set(first), job_output()       # killed, not successful
    failed = project.failed()
    assert set(running) <= set(failed), job_output()
    if how == "batch":
        assert all(failed[task] == "interrupted" for task in running), (failed, job_output())

    os.remove(os.path.join(project.dir, "hold"))
    result = project.run()
    assert result.returncode == 0, report(result)
    after = project.successful()
    assert sorted(after) == ["0", "1", "2", "3"], after      # each exactly once
    assert after[:len(first)] == first


# -- ssh --------------------------------------------------------------------------------

@needs_sshd
def test_ssh_to_localhost_runs_in_the_project_directory(project):
    sweep(project, ssh_resources(SSH_OPTIONS, hosts='["127.0.0.1:2"]', workers=1))
    result = project.run()
    assert result.returncode == 0, report(result)
    records = seen(project)
    assert sorted(project.successful()) == ["0", "1", "2", "3"] == sorted(records)
    assert all(r["cwd"] == project.dir and r["mylib"] == 42 for r in records.values())
    assert all(r["SLURM_JOB_ID"] is None for r in records.values())
    assert len(set(r["pid"] for r in records.values())) >= 2     # "127.0.0.1:2": 2 workers


# -- the main process killed: nothing is left behind ----------------------------------

@pytest.mark.parametrize("launcher", [
    pytest.param("slurm", marks=needs_slurm),
    pytest.param("ssh", marks=needs_sshd),
])
def test_main_process_killed_leaves_no_worker_or_step(project, cluster, launcher):
    if launcher == "slurm":
        resources = 'LAUNCHER = "slurm"\nNUM_WORKERS = 2\n'
    else:
        resources = ssh_resources(SSH_OPTIONS)
    sweep(project, resources, hold=True)
    process = project.start()
    try:
        wait_for(lambda: len(started(project)) == 2, timeout=60)
        jobs = [r["SLURM_JOB_ID"] for r in seen(project).values() if r["SLURM_JOB_ID"]]
        assert len(jobs) == (2 if launcher == "slurm" else 0)
        assert processes_of(project.dir)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

        def nothing_left():
            return not processes_of(project.dir) and not (jobs and live_jobs_and_steps(jobs))
        try:
            wait_for(nothing_left, timeout=60, interval=0.2)
        except AssertionError:
            left = processes_of(project.dir)
            message = "60 s after the main process was killed: processes %s, Slurm %s" % (
                [p.info["cmdline"] for p in left], jobs and live_jobs_and_steps(jobs))
            for leftover in left:        # do not let them spoil the following tests
                try:
                    leftover.kill()
                except Exception:
                    pass
            raise AssertionError(message)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
    assert project.successful() == []

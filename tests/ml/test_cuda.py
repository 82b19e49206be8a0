"""Real GPUs: PyTorch on CUDA in workers, a GPU shared by two workers, and
`show`'s GPU memory from the real nvidia-smi.  They run only where
`nvidia-smi -L` lists a real GPU (the fake one of tests/fake_bin is never
on PATH here) and skip with that reason elsewhere."""

import importlib.util
import json
import os
import shutil
import subprocess
import pytest

from conftest import TASK_IMPORTS_WAIT_FOR, needs_gputil, wait_for
from workloads import check_succeeded, need_libraries, results

need_libraries()


def real_gpus():
    """How many GPUs the real nvidia-smi lists (0 without one)."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, universal_newlines=True,
                                timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


GPUS = real_gpus()
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="no real GPU: `nvidia-smi -L` lists none")
needs_two = pytest.mark.skipif(GPUS < 2, reason="needs two real GPUs; `nvidia-smi -L` "
                                                "lists %d" % GPUS)

ON_CUDA = TASK_IMPORTS_WAIT_FOR + """
import json, os, torch

def wait_for_workers(task_folder, count):
    # Each task waits until `count` workers hold one, so that all are seen.
    here = os.path.join(os.path.dirname(os.path.dirname(task_folder)), "workers")
    os.makedirs(here, exist_ok=True)
    open(os.path.join(here, str(os.getpid())), "w").close()
    wait_for(lambda: len(os.listdir(here)) >= count, timeout=300,
             message="%d workers to hold a task" % count)

def task_method(variables, task_folder, log_file):
    wait_for_workers(task_folder, int(os.environ.get("WORKERS", "1")))
    net = variables["model"]
    x = torch.randn(256, 64, device="cuda:0")
    loss = net(x).pow(2).mean()
    loss.backward()
    torch.cuda.synchronize()
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"visible": os.environ["CUDA_VISIBLE_DEVICES"], "worker": os.getpid(),
                   "count": torch.cuda.device_count(),
                   "device": str(next(net.parameters()).device),
                   "loss": float(loss)}, stream)
    if os.environ.get("RELEASE_FILE"):   # hold the GPU memory until the test has seen it
        wait_for(lambda: os.path.exists(os.environ["RELEASE_FILE"]), timeout=600,
                 message="the test to create RELEASE_FILE")
"""

MODEL_VARIABLES = """
import torch

def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["a", "b"])
    variable_set.add_variable(name="seed", values=[0, 1])

def model_to_value(string_value, nickname):
    net = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(),
                              torch.nn.Linear(512, 1)).to("cuda:0")
    net.ballast = torch.empty(64 * 1024 * 1024, device="cuda:0")   # 256 MB to be seen
    return net
"""


@pytest.mark.skipif(importlib.util.find_spec("GPUtil") is None,
                    reason="GPUtil is not installed here")
def test_gputil_imports_on_this_python():
    """Installed, GPUtil must import (it imports distutils: setuptools must be
    there on 3.12+); so this one fails, not skips, where it does not."""
    import GPUtil
    assert hasattr(GPUtil, "getGPUs")


@needs_two
@needs_gputil
def test_a_torch_model_on_cuda_in_each_of_two_workers(project):
    project.write(task=ON_CUDA, variables=MODEL_VARIABLES,
                  resources="NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 1\n")
    result = project.run(timeout=600, env={"WORKERS": "2"})
    check_succeeded(project, result, 4)
    seen = list(results(project).values())
    assert {s["count"] for s in seen} == {1}
    assert {s["device"] for s in seen} == {"cuda:0"}
    gpu_of = {s["worker"]: s["visible"] for s in seen}
    assert len(gpu_of) == 2 and len(set(gpu_of.values())) == 2   # a GPU each


@needs_gpu
@needs_gputil
def test_two_workers_share_one_gpu(project):
    project.write(task=ON_CUDA, variables=MODEL_VARIABLES,
                  resources="NUM_WORKERS = 2\nNUM_GPUS_PER_WORKER = 0.5\nINCLUDE_GPUS = ['0']\n")
    result = project.run(timeout=600, env={"WORKERS": "2"})
    check_succeeded(project, result, 4)
    seen = list(results(project).values())
    assert len({s["worker"] for s in seen}) == 2
    assert {s["visible"] for s in seen} == {"0"}


@needs_gpu
@needs_gputil
def test_show_gives_each_workers_gpu_memory_from_nvidia_smi(project):
    project.write(task=ON_CUDA, variables=MODEL_VARIABLES,
                  resources="NUM_WORKERS = 1\nNUM_GPUS_PER_WORKER = 1\n")
    release = os.path.join(project.dir, "release")
    run = project.start(env={"RELEASE_FILE": release})
    status = os.path.join(project.queue, "status.json")

    def gpu_memory_of_worker_0():
        """'512.0M'-like figure in the worker row of `show` (status.json), once known."""
        try:
            with open(status) as stream:
                table = json.load(stream)["show"]
        except (OSError, ValueError, KeyError):
            return None
        for line in table.splitlines():
            if line.split()[:1] == ["0"]:
                now = line.split()[-1].split("/")[0]
                return now if now[-1:] in ("M", "G") else None
        return None

    try:
        now = wait_for(gpu_memory_of_worker_0, timeout=300)
    finally:
        open(release, "w").close()
    megabytes = float(now[:-1]) * (1024 if now.endswith("G") else 1)
    assert megabytes >= 256, now      # the 256 MB ballast at least, as nvidia-smi saw it
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, out + err

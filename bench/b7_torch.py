"""B7 a real PyTorch CPU sweep: threadward against joblib and a
ProcessPoolExecutor, written the way their users write it.

The sweep: 2 models x 3 learning rates x 4 seeds = 24 tasks on 2 workers, a
linear probe on a frozen backbone (the common "evaluate a checkpoint under
a grid" sweep).  Loading a model is real work: building the backbone (a 51M
parameter embedding table and two dense layers), `torch.load` of its 217 MB
checkpoint, and a DataLoader with 2 persistent worker processes whose
first batch starts them.  A task trains a fresh head for one epoch of 32
batches through the backbone and scores it.  On the 2-core VM a load takes
about as long as a task, which is what such probe and evaluation sweeps see
(a checkpoint and its data pipeline cost about one evaluation pass).

The same module (sweep_lib.py, written into the scratch folder) runs under
every method, each timed end to end as a fresh process:

* threadward: `model_to_value` loads, the task trains; CPU share as shipped
  (each worker's OMP_NUM_THREADS = cores / workers), and with
  CPUS_PER_WORKER = every core (each worker's torch on all cores, as before
  the share was set);
* joblib: `Parallel(n_jobs=2)(delayed(task)(...) ...)`, loading in every task,
  and with a per-process `functools.lru_cache(maxsize=None)` of the load
  (it never loads a model twice in one process: the best case for it);
* `concurrent.futures.ProcessPoolExecutor(2)`: the same two ways.

Loads are counted from a file each load appends to.
"""

import os
import subprocess
import sys
import time

import common

LIBRARY = '''
import functools, os, time
import torch
from torch.utils.data import DataLoader, TensorDataset

VOCAB, TOKENS, WIDTH = %(vocab)d, 8, 1024
BATCHES, BATCH = %(batches)d, 128
HERE = os.path.dirname(os.path.abspath(__file__))


def backbone(name):
    torch.manual_seed(sum(map(ord, name)))
    return torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, 256), torch.nn.Flatten(),
        torch.nn.Linear(256 * TOKENS, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU())


def save_checkpoints(names):
    for name in names:
        torch.save(backbone(name).state_dict(), os.path.join(HERE, name + ".pt"))


def load(name):
    """The expensive part: the model, its checkpoint, its data pipeline."""
    net = backbone(name)
    net.load_state_dict(torch.load(os.path.join(HERE, name + ".pt")))
    net.eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCHES * BATCH, TOKENS), generator=generator)
    labels = tokens[:, 0] %% 10
    # fork, the default on Linux, named: inside a loky worker the default
    # context is loky's, whose processes DataLoader cannot start.
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=BATCH, shuffle=True,
                        num_workers=2, persistent_workers=True, multiprocessing_context="fork")
    next(iter(loader))   # starts the loader's worker processes
    with open(os.path.join(HERE, "loads.txt"), "a") as stream:
        stream.write("%%s %%d\\n" %% (name, os.getpid()))
    return net, loader


@functools.lru_cache(maxsize=None)
def cached_load(name):
    return load(name)


def train(loaded, lr, seed):
    """One epoch of a fresh linear head on the frozen backbone; its accuracy."""
    net, loader = loaded
    torch.manual_seed(seed)
    head = torch.nn.Linear(WIDTH, 10)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr)
    correct = seen = 0
    for tokens, labels in loader:
        with torch.no_grad():
            features = net(tokens)
        logits = head(features)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return correct / seen


def task(name, lr, seed, cache):
    return train(cached_load(name) if cache else load(name), lr, seed)
'''

# The peers, as their users write them: one script, the sweep in a list.
DRIVER = '''
import itertools, sys
import sweep_lib

grid = list(itertools.product(%(models)r, %(lrs)r, %(seeds)r))
method, cache = sys.argv[1], sys.argv[2] == "cache"
if method == "joblib":
    from joblib import Parallel, delayed
    scores = Parallel(n_jobs=2)(delayed(sweep_lib.task)(m, lr, s, cache) for m, lr, s in grid)
else:
    import concurrent.futures
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        scores = list(pool.map(sweep_lib.task, *zip(*grid), [cache] * len(grid)))
assert len(scores) == len(grid) and all(0 <= s <= 1 for s in scores)
'''

TASK = '''
import sweep_lib

def task_method(variables, task_folder, log_file):
    score = sweep_lib.train(variables["model"], variables["lr"], variables["seed"])
    assert 0 <= score <= 1
'''
VARIABLES = '''
import sweep_lib

def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=%(models)r)
    variable_set.add_variable(name="lr", values=%(lrs)r)
    variable_set.add_variable(name="seed", values=%(seeds)r)

def model_to_value(string_value, nickname):
    return sweep_lib.load(string_value)
'''


def count_loads(folder):
    path = os.path.join(folder, "loads.txt")
    loads = common.count_lines(path)
    if os.path.exists(path):
        os.unlink(path)
    return loads


def timed(command, folder, env):
    log_path = os.path.join(folder, "bench-run.log")
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        result = subprocess.run(command, cwd=folder, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, timeout=1800)
        wall = time.perf_counter() - started
    if result.returncode != 0:
        with open(log_path, "rb") as stream:
            raise RuntimeError("%s exited %d:\n%s" % (command, result.returncode,
                                                      stream.read()[-3000:].decode()))
    return wall


def main():
    sizes = {"models": ["backbone-a", "backbone-b"], "lrs": [0.01, 0.03, 0.1],
             "seeds": common.pick([0, 1, 2, 3], [0, 1]),
             "vocab": common.pick(200000, 50000), "batches": common.pick(32, 8)}
    tasks = len(sizes["models"]) * len(sizes["lrs"]) * len(sizes["seeds"])
    cores = len(os.sched_getaffinity(0))
    with common.Scratch("b7") as scratch:
        folder = scratch.path
        with open(os.path.join(folder, "sweep_lib.py"), "w") as stream:
            stream.write(LIBRARY % sizes)
        with open(os.path.join(folder, "driver.py"), "w") as stream:
            stream.write(DRIVER % sizes)
        env = common.clean_env({"PYTHONPATH": folder})
        env["PYTHONPATH"] = os.pathsep.join([common.ROOT, folder])
        for name in [n for n in os.environ if n.endswith("_NUM_THREADS")]:
            env.pop(name, None)   # each method decides its threads, as for a user
        subprocess.run([sys.executable, "-c", "import sweep_lib; sweep_lib.save_checkpoints(%r)"
                        % sizes["models"]], cwd=folder, env=env, check=True)

        def threadward(resources):
            common.make_project(folder, TASK, VARIABLES % sizes, resources)
            wall = timed(common.cli(folder, "--fresh"), folder, env)
            done = common.count_lines(common.queue_file(folder))
            if done != tasks:
                raise RuntimeError("threadward recorded %d of %d tasks" % (done, tasks))
            return wall

        runs = [
            ("threadward (CPU share: %d thread per worker)" % max(1, cores // 2),
             lambda: threadward("NUM_WORKERS = 2\n")),
            ("threadward, CPUS_PER_WORKER = %d (every core, as before)" % cores,
             lambda: threadward("NUM_WORKERS = 2\nCPUS_PER_WORKER = %d\n" % cores)),
            ("joblib Parallel(n_jobs=2), load in each task",
             lambda: timed([sys.executable, "driver.py", "joblib", "load"], folder, env)),
            ("joblib Parallel(n_jobs=2) + lru_cache of the load",
             lambda: timed([sys.executable, "driver.py", "joblib", "cache"], folder, env)),
            ("ProcessPoolExecutor(2), load in each task",
             lambda: timed([sys.executable, "driver.py", "pool", "load"], folder, env)),
            ("ProcessPoolExecutor(2) + lru_cache of the load",
             lambda: timed([sys.executable, "driver.py", "pool", "cache"], folder, env)),
        ]
        measured = []
        for label, run in runs:
            wall = run()
            measured.append((label, wall, count_loads(folder)))
            print("  %-58s %6.1f s" % (label, wall))
            sys.stdout.flush()
    ours = measured[0][1]
    rows = [(label, wall, loads, wall / ours) for label, wall, loads in measured]
    common.table("B7: %d tasks (2 models x 3 lr x %d seeds), 2 workers, %d cores"
                 % (tasks, len(sizes["seeds"]), cores),
                 ["method", "wall s", "loads", "x threadward"], rows)
    ahead = all(wall > ours for _, wall, _ in measured[2:])
    print("target: ahead of every joblib and ProcessPoolExecutor variant: %s"
          % common.verdict(ahead))


if __name__ == "__main__":
    main()

"""The task threadward runs once per combination of variables, and its hooks.

Only task_method is required.  Delete any hook you do not need.
Everything a task prints (and any error) goes to its log file by default.
"""

import json
import time
import os

# How threadward decides that a task succeeded:
#   "NO_ERROR_AND_VERIFY" (default)  no exception, and verify_task_success returns True
#   "NO_ERROR_ONLY"                  no exception; verify_task_success is not called
#   "VERIFY_ONLY"                    verify_task_success returns True, exception or not
#   "ALWAYS_SUCCESS"                 every task succeeds
SUCCESS_CONDITION = "NO_ERROR_AND_VERIFY"

# Where a task's output (print, logging, C libraries, child processes) goes:
#   "LOG_FILE_ONLY" (default)        the task's log_file only
#   "CONSOLE_ONLY"                   the terminal only (confusing with several workers)
#   "LOG_FILE_AND_CONSOLE"           both
OUTPUT_MODE = "LOG_FILE_ONLY"

# Seconds a task may run before its worker is ended and the task recorded as
# failed with the reason "timeout" (None: no limit).
TASK_TIMEOUT = None

# Seconds running tasks get to finish after threadward receives SIGTERM (as
# Slurm sends before it ends a job); then they are ended and recorded as
# "interrupted", so the next `threadward run` retries them.
SIGTERM_GRACE = 20

# How many more times a failed task runs (an error, verify_task_success
# false, a timeout, a worker that died; never an interrupted one) before it
# is recorded as failed.  The console says "retrying ID (attempt 2 of 3)".
RETRIES = 0


def task_method(variables, task_folder, log_file):
    """Run one task.

    variables    {variable name: value}; a value is what NAME_to_value in
                 variable_iteration.py returned for it, if that function exists.
    task_folder  this task's own folder (already created): save results here.
    log_file     the file this task's output goes to.
    Raise an exception to fail the task.  A dict of JSON values you return
    is saved as task_folder/result.json (as this example writes its own);
    `threadward results` and threadward.results(directory) make one table
    of every task's.
    """
    model, dataset, seed = variables["model"], variables["dataset"], variables["seed"]
    time.sleep(0.3)   # pretend to work
    score = (len(model["name"]) * 7 + len(dataset) * 3 + seed) % 100 / 100.0
    print("evaluating %s on %s with seed %s: score %.2f" % (model["name"], dataset, seed, score))
    with open(os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump({"model": model["name"], "dataset": dataset, "seed": seed,
                   "score": score}, stream)


def verify_task_success(variables, task_folder, log_file):
    """Return True if the task did what it should (called after it, in the worker)."""
    return os.path.exists(os.path.join(task_folder, "result.json"))


def before_all_tasks():
    """Called once in the main process, before any worker starts."""


def after_all_tasks():
    """Called once in the main process at the very end, whatever happened."""


def before_each_worker(worker_id):
    """Called in each worker process when it starts (worker_id counts from 0).
    Its output goes to threadward/worker_logs/worker_<id>.log."""


def after_each_worker(worker_id):
    """Called in each worker process before it shuts down."""


def before_each_task(variables, task_folder, log_file):
    """Called in the worker before task_method.  Changes you make to
    `variables` here are what task_method, after_each_task and
    verify_task_success see."""


def after_each_task(variables, task_folder, log_file):
    """Called in the worker after task_method, even when it raised."""

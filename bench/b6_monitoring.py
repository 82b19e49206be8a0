"""B6 monitoring overhead: CPU time of the main process with 8 workers.

8 workers run tasks that sleep 0.25 s, so the main process has little to do
besides dispatching and monitoring.  Three runs of the same sweep:

- monitoring off: psutil made unimportable (a shim on PYTHONPATH), no GPUs;
- psutil: CPU only, psutil samples the 8 worker trees;
- psutil + nvidia-smi: NUM_GPUS_PER_WORKER = 1 on 8 fake GPUs
  (tests/fake_bin/nvidia-smi on PATH, FAKE_GPU_COUNT=8), so the
  --query-compute-apps call runs at every sample too.

Main CPU is user + system time of the main pid alone (/proc/PID/stat, read
after it exits but before it is reaped), so workers and nvidia-smi children
are not counted.  "steady" is the CPU rate between 20% and 80% of the run,
without start-up and teardown.  Monitoring's cost is the difference to the
monitoring-off run.
"""

import os
import subprocess
import time

import common

WORKERS = 8
SECONDS = 0.25

RESOURCES = "NUM_WORKERS = %d\nNUM_GPUS_PER_WORKER = %d\n"


def run_once(scratch, label, count, gpus, env):
    directory = scratch.sub(label)
    common.make_project(directory, common.SLEEP_TASK % SECONDS, common.RANGE_VARIABLES % count,
                        RESOURCES % (WORKERS, gpus))
    log_path = os.path.join(directory, "bench-run.log")
    samples = []
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(common.cli(directory), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=common.clean_env(env))
        while True:
            cpu = common.proc_cpu_seconds(process.pid)
            if cpu is not None:
                samples.append((time.perf_counter() - started, cpu))
            if common.wait_keep_zombie(process, 0.25):
                break
        wall = time.perf_counter() - started
        cpu = common.proc_cpu_seconds(process.pid)
        process.wait()
    common.check_run(directory, process.returncode, count, log_path)
    if cpu is None:
        cpu = samples[-1][1]
    low = next(s for s in samples if s[0] >= 0.2 * wall)
    high = [s for s in samples if s[0] <= 0.8 * wall][-1]
    steady = (high[1] - low[1]) / (high[0] - low[0]) if high[0] > low[0] else None
    return {"wall": wall, "cpu": cpu, "steady": steady}


def main():
    count = WORKERS * common.pick(60, 10)
    rows = []
    with common.Scratch("b6") as scratch:
        shim = scratch.sub("no-psutil")
        os.makedirs(shim)
        with open(os.path.join(shim, "psutil.py"), "w") as stream:
            stream.write("raise ImportError('psutil hidden by the benchmark')\n")
        python_path = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH")) if p)
        gpu_log = scratch.sub("nvidia-smi-calls.txt")
        configs = [
            ("monitoring off", 0, {"PYTHONPATH": python_path}),
            ("psutil", 0, {}),
            ("psutil + nvidia-smi", 1, {
                "PATH": common.FAKE_BIN + os.pathsep + os.environ.get("PATH", ""),
                "FAKE_GPU_COUNT": str(WORKERS), "FAKE_GPU_LOG": gpu_log}),
        ]
        results = []
        for label, gpus, env in configs:
            results.append(run_once(scratch, label.replace(" ", "-").replace("+", ""), count,
                                    gpus, env))
        queries = common.count_lines(gpu_log)
    off = results[0]
    for (label, _, _), result in zip(configs, results):
        rows.append([label, count, result["wall"], result["cpu"],
                     100.0 * result["cpu"] / result["wall"],
                     100.0 * result["steady"] if result["steady"] is not None else None,
                     100.0 * (result["steady"] - off["steady"])
                     if result["steady"] is not None and off["steady"] is not None else None])
    full = rows[-1]
    notes = [
        "%d tasks of %.2f s on %d workers (ideal %.1f s); nvidia-smi was called %d times "
        "(GPUtil's --query-gpu at start, then --query-compute-apps per sample)"
        % (count, SECONDS, WORKERS, count * SECONDS / WORKERS, queries),
        "target: main process < 2%% of one core with psutil + nvidia-smi: whole run %.2f%% "
        "%s; monitoring's share (steady, minus monitoring off) %.2f%% %s"
        % (full[4], common.verdict(full[4] < 2.0), full[6] or 0.0,
           common.verdict(full[6] is not None and full[6] < 2.0)),
    ]
    common.table("B6 main-process CPU with %d workers" % WORKERS,
                 ["monitoring", "tasks", "wall s", "main CPU s", "% core (run)",
                  "% core (steady)", "monitoring % (steady)"], rows, notes)
    return {"total_pct": full[4], "monitoring_pct": full[6]}

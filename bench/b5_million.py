"""B5 a million-task sweep: 10 x 100 x 1,000 no-op tasks on 2 workers, and
the same million as one variable of 1,000,000 values.

Time to first task: the first task to run creates a marker file with
O_CREAT | O_EXCL and writes time.time() into it; measured from just before
the CLI starts.  Main-process peak RSS: VmHWM of the main pid, read from
/proc while it runs (the largest reading is kept).  Worker RSS: the largest
RSS of any worker seen (psutil), which must not grow with the sweep.

Per-task cost: the rate between two counts of successful_tasks.txt lines,
polled every 20 ms.  The 10,000-task sweep (10 x 100 x 10) runs to the end
and is measured between tasks 2,000 and 8,000; the big sweep is measured
between tasks 5,000 and 15,000, then stopped with the console command `q`
on stdin once 20,000 tasks are done.  So is the one-variable sweep: the
same million tasks, but a million values for the main process to check,
name and queue where the big sweep has 1,110.  (Quick: 5,000 and 100,000
tasks.)

Every sweep runs twice: on the scratch disk (TMPDIR), and on tmpfs
(/dev/shm) where creating folders and logs costs no disk time, so the
per-task comparison shows threadward's own scaling without disk noise.

The timeline events' cost (issue 16): on each storage the big sweep runs
again with threadward.TIMELINE_EVENTS off (common.cli(events=False)), same
window and stop, in the order on, off, off, on (quick: on, off), so a
drift of the machine's load falls on both alike; the best rate of each is
kept and the cost is the events-on time per task over the events-off
time, less 1.  events.jsonl's size per finished task is reported for
every sweep run.
"""

import os
import subprocess
import time

import common

WORKERS = 2

TASK = """
import os
import time

SUCCESS_CONDITION = "NO_ERROR_ONLY"
_tried = False


def task_method(variables, task_folder, log_file):
    global _tried
    if _tried:
        return
    _tried = True
    try:
        fd = os.open(%r, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return
    os.write(fd, repr(time.time()).encode())
    os.close(fd)
"""
VARIABLE = """
    variable_set.add_variable(name=%r, values=list(range(%d)))"""


def variables(shape):
    """setup_variable_set of model x dataset x seed, or of one "prompt"."""
    names = ("prompt",) if len(shape) == 1 else ("model", "dataset", "seed")
    return "def setup_variable_set(variable_set):" + "".join(
        VARIABLE % pair for pair in zip(names, shape)) + "\n"


def sweep_name(shape):
    return " x ".join(map(str, shape)) if len(shape) > 1 else "one of %d" % shape[0]


def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def measure(scratch, label, shape, window, stop_at=None, timeout=600, events=True):
    directory = scratch.sub(label)
    marker = os.path.join(directory, "first-task")
    common.make_project(directory, TASK % marker, variables(shape),
                        "NUM_WORKERS = %d\n" % WORKERS)
    total = 1
    for count in shape:
        total *= count
    success_path = common.queue_file(directory)
    log_path = os.path.join(directory, "bench-run.log")
    psutil = _psutil()
    samples = []
    main_hwm = worker_rss = 0
    quit_sent = None
    with open(log_path, "wb") as log:
        started_wall = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(common.cli(directory, events=events), stdin=subprocess.PIPE,
                                   stdout=log, stderr=subprocess.STDOUT, env=common.clean_env())
        stream, count, next_rss = None, 0, 0.0
        while process.poll() is None:
            now = time.perf_counter()
            if now - started > timeout:
                process.kill()
                process.wait()
                raise RuntimeError("%s did not finish in %d s" % (label, timeout))
            hwm = common.proc_status_kib(process.pid, "VmHWM")
            if hwm:
                main_hwm = max(main_hwm, hwm)
            if stream is None and os.path.exists(success_path):
                stream = open(success_path, "rb")
            if stream is not None:
                count += stream.read().count(b"\n")
                samples.append((now, count))
            if psutil is not None and now >= next_rss:
                next_rss = now + 0.5
                try:
                    for child in psutil.Process(process.pid).children():
                        worker_rss = max(worker_rss, child.memory_info().rss)
                except psutil.Error:
                    pass
            if stop_at is not None and quit_sent is None and count >= stop_at:
                process.stdin.write(b"q\n")
                process.stdin.flush()
                quit_sent = now
            time.sleep(0.02)
        ended = time.perf_counter()
        if stream is not None:
            stream.close()
    process.stdin.close()
    common.check_run(directory, process.returncode, None, log_path,
                     allowed=(1,) if stop_at is not None else (0,))
    done = common.count_lines(success_path)
    try:
        with open(marker) as stream:
            first = float(stream.read()) - started_wall
    except (OSError, ValueError):
        first = None
    low, high = window
    t_low = next((t for t, c in samples if c >= low), None)
    c_low = next((c for t, c in samples if c >= low), None)
    t_high = next((t for t, c in samples if c >= high), None)
    c_high = next((c for t, c in samples if c >= high), None)
    rate = (c_high - c_low) / (t_high - t_low) if t_high and t_high > t_low else None
    size = os.path.getsize(common.queue_file(directory, "all_tasks.json"))
    events_size = common.events_bytes(directory)
    return {"label": label, "sweep": sweep_name(shape), "total": total, "done": done,
            "first": first, "main_mb": main_hwm / 1024.0,
            "worker_mb": worker_rss / 2 ** 20 if psutil else None,
            "window": "%s-%s" % ("{:,}".format(low), "{:,}".format(high)), "rate": rate,
            "json_mb": size / 2 ** 20, "wall": ended - started,
            "events_b": events_size / done if done else None,
            "quit_s": ended - quit_sent if quit_sent else None}


def main():
    seeds = common.pick(1000, 100)
    big_window = common.pick((5000, 15000), (2000, 6000))
    big_stop = common.pick(20000, 8000)
    # The events-off comparison: on, off, off, on (the first "on" is the big
    # sweep's own run); quick: on, off.
    order = common.pick([False, False, True], [False])
    storages = [("disk", None)]
    shm = common.tmpfs_dir()
    if shm:
        storages.append(("tmpfs", shm))
    rows, results, ones, event_runs = [], {}, {}, {}
    for storage, base in storages:
        with common.Scratch("b5", base) as scratch:
            small = measure(scratch, "small", (10, 100, common.pick(10, 5)),
                            common.pick((2000, 8000), (1000, 4000)))
            big = measure(scratch, "big", (10, 100, seeds), big_window, stop_at=big_stop)
            runs = {True: [big], False: []}
            for index, events in enumerate(order):
                runs[events].append(measure(
                    scratch, "big-%s-%d" % ("on" if events else "off", index),
                    (10, 100, seeds), big_window, stop_at=big_stop, events=events))
            one = measure(scratch, "one", (1000 * seeds,),
                          common.pick((5000, 15000), (2000, 6000)),
                          stop_at=common.pick(20000, 8000))
        for result in (small, big, one):
            ratio = small["rate"] / result["rate"] if small["rate"] and result["rate"] else None
            result["ratio"] = ratio
            rows.append([storage, result["sweep"], result["total"],
                         result["done"], result["first"], result["main_mb"],
                         result["worker_mb"], result["json_mb"], result["window"],
                         int(round(result["rate"])) if result["rate"] else None,
                         1000.0 / result["rate"] if result["rate"] else None, ratio,
                         result["wall"], result["quit_s"], result["events_b"]])
        results[storage] = big
        ones[storage] = one
        event_runs[storage] = runs
    big, one = results["disk"], ones["disk"]
    cost = " ".join("%s %.2f x %s" % (storage, results[storage]["ratio"] or 0, common.verdict(
        results[storage]["ratio"] is not None and results[storage]["ratio"] <= 1.5))
        for storage, _ in storages)
    notes = [
        "targets (disk, %s tasks): first task < 20 s: %s (%.1f s); main RSS < 500 MB: %s "
        "(%.0f MB); per-task cost <= 1.5 x the small sweep's: %s"
        % ("{:,}".format(big["total"]),
           common.verdict(big["first"] is not None and big["first"] < 20), big["first"] or 0,
           common.verdict(big["main_mb"] < 500), big["main_mb"], cost),
        "one variable (disk, %s values): first task < 5 s: %s (%.1f s); main RSS < 120 MB: "
        "%s (%.0f MB)" % ("{:,}".format(one["total"]),
                          common.verdict(one["first"] is not None and one["first"] < 5),
                          one["first"] or 0, common.verdict(one["main_mb"] < 120), one["main_mb"]),
        "cost x small = the small sweep's rate / this rate, on the same storage; "
        "quit s = from `q` to exit; disk = TMPDIR, tmpfs = /dev/shm; "
        "events B/task = events.jsonl bytes / tasks ran",
    ]
    common.table("B5 large sweeps on %d workers (no-op tasks)" % WORKERS,
                 ["storage", "sweep", "tasks", "ran", "first task s", "main RSS MB",
                  "worker RSS MB", "all_tasks MB", "window", "tasks/s", "ms/task",
                  "cost x small", "wall s", "quit s", "events B/task"], rows, notes)

    event_rows, best, costs = [], {}, {}
    for storage, _ in storages:
        for events in (True, False):
            runs = event_runs[storage][events]
            rates = [r["rate"] for r in runs if r["rate"]]
            best[storage, events] = max(rates) if rates else None
            top = best[storage, events]
            event_rows.append([
                storage, "on" if events else "off", len(runs),
                " / ".join("{:,.0f}".format(r["rate"]) if r["rate"] else "-" for r in runs),
                int(round(top)) if top else None, 1000.0 / top if top else None,
                max(r["first"] or 0 for r in runs), max(r["main_mb"] for r in runs),
                sum(r["events_b"] or 0 for r in runs) / len(runs)])
        costs[storage] = common.events_cost(best[storage, True], best[storage, False])[0]
    sequence = ", ".join("on" if e else "off" for e in [True] + order)
    event_notes = [
        "target: events cost <= %d %% (issue 16): %s" % (
            100 * common.EVENTS_TARGET, "; ".join(
                "%s %s" % (storage, common.events_verdict(best[storage, True],
                                                          best[storage, False]))
                for storage, _ in storages)),
        "events cost = events-on time per task / events-off time per task - 1, from the best "
        "tasks/s of each between tasks %s and %s; runs in the order %s on each storage"
        % ("{:,}".format(big_window[0]), "{:,}".format(big_window[1]), sequence),
        "events off: threadward.TIMELINE_EVENTS = False (only the run, task and end lines); "
        "first task s, main RSS MB: the largest of the runs; events B/task: their mean",
    ]
    common.table("B5 the timeline events' cost on the %s sweep (%s tasks, `q` at %s)"
                 % (sweep_name((10, 100, seeds)), "{:,}".format(1000 * seeds),
                    "{:,}".format(big_stop)),
                 ["storage", "events", "runs", "tasks/s per run", "best tasks/s", "ms/task",
                  "first task s", "main RSS MB", "events B/task"], event_rows, event_notes)
    return {"first": big["first"], "main_mb": big["main_mb"], "cost_ratio": big["ratio"],
            "one_first": one["first"], "one_main_mb": one["main_mb"],
            "events_cost": costs}

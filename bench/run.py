"""Run threadward's benchmark suite: python bench/run.py [--quick] [B1 ... B7].

With no names it runs all seven.  --quick (or BENCH_QUICK=1) shrinks every
size for a smoke run; BENCH_KEEP=1 keeps the temporary projects.
"""

import argparse
import importlib
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

BENCHMARKS = {
    "B1": ("b1_dispatch", "dispatch of no-op tasks vs process pools"),
    "B2": ("b2_sleep", "50 ms sleep tasks vs the ideal schedule"),
    "B3": ("b3_loads", "expensive model loads vs a cached process pool"),
    "B4": ("b4_simulation", "scheduler simulation: loads and makespan"),
    "B5": ("b5_million", "a million-task sweep: first task, RSS, per-task cost"),
    "B6": ("b6_monitoring", "monitoring overhead of the main process"),
    "B7": ("b7_torch", "a real PyTorch CPU sweep vs joblib and ProcessPoolExecutor"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="B1..B7",
                        help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a fast smoke run (same as BENCH_QUICK=1)")
    args = parser.parse_args(argv)
    if args.quick:
        common.set_quick(True)
    names = [n.upper() for n in args.names] or sorted(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error("unknown benchmark %s; choose from %s"
                     % (", ".join(unknown), ", ".join(sorted(BENCHMARKS))))
    print("threadward benchmarks%s: %s" % (" (quick)" if common.QUICK else "", " ".join(names)))
    print("%s; %d CPUs; Python %s; %s" % (
        time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.cpu_count(), platform.python_version(),
        platform.platform()))
    failed = []
    started = time.perf_counter()
    for name in names:
        module_name, what = BENCHMARKS[name]
        print("\n== %s: %s" % (name, what))
        sys.stdout.flush()
        begun = time.perf_counter()
        try:
            importlib.import_module(module_name).main()
        except Exception as exc:   # one broken benchmark must not hide the others
            failed.append(name)
            traceback.print_exc()
            print("%s FAILED: %s: %s" % (name, type(exc).__name__, exc))
        print("(%s took %.1f s)" % (name, time.perf_counter() - begun))
    print("\nall done in %.1f s%s" % (time.perf_counter() - started,
                                      "; failed: " + " ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

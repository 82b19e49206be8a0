"""The worker's protocol channel is private: nothing a task prints (at the
Python level, at the file-descriptor level, from C code or from child
processes) or reads can corrupt or steal a protocol message, and the task's
output lands in that task's own log.

Each project runs several tasks one after another on one worker, so that a
leak in one task would corrupt the channel that the next task arrives on.
"""

import json

import pytest


def console(result):
    return result.stdout + result.stderr


def resources(workers):
    return "NUM_WORKERS = %d\n" % workers


VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3, 4])
"""

# Every task writes result.json; verify_task_success checks it, so a task
# whose result went astray fails.
RESULT = """

def _save(task_folder, variables, **extra):
    record = {"x": variables["x"], "square": variables["x"] ** 2}
    record.update(extra)
    with open(_os.path.join(task_folder, "result.json"), "w") as stream:
        json.dump(record, stream)


def verify_task_success(variables, task_folder, log_file):
    with open(_os.path.join(task_folder, "result.json")) as stream:
        record = json.load(stream)
    return record["x"] == variables["x"] and record["square"] == variables["x"] ** 2
"""


def task_source(body, mode=None):
    header = "import json\nimport os as _os\nimport subprocess\nimport sys\n"
    if mode is not None:
        header += "OUTPUT_MODE = %r\n" % mode
    return header + RESULT + body


def check_all_succeeded(project, result, values=(1, 2, 3, 4)):
    assert result.returncode == 0, console(result)
    assert sorted(project.successful()) == sorted(str(x) for x in values)
    assert project.failed() == {}
    for x in values:
        record = json.loads(project.output(str(x), "result.json"))
        assert record["x"] == x and record["square"] == x * x


# --------------------------------------------------------------------------
# print, fd-level writes, child processes
# --------------------------------------------------------------------------

NOISY_TASK = """

def task_method(variables, task_folder, log_file):
    x = variables["x"]
    print("print-%d" % x)
    sys.stderr.write("stderr-%d\\n" % x)
    _os.write(1, ("fd1-%d\\n" % x).encode())
    _os.write(2, ("fd2-%d\\n" % x).encode())
    subprocess.run(["echo", "echo-child-%d" % x], check=True)
    subprocess.run(["sh", "-c", "printf 'sh-fd1-%d\\\\n' >&1; printf 'sh-fd2-%d\\\\n' >&2"
                    % (x, x)], check=True)
    subprocess.run([sys.executable, "-c", "print('python-child-%d')" % x], check=True)
    sys.stdout.write("no-newline-%d" % x)    # left in Python's buffer at the end
    _save(task_folder, variables)
"""

NOISY_MARKERS = ["print-%d", "stderr-%d", "fd1-%d", "fd2-%d", "echo-child-%d", "sh-fd1-%d",
                 "sh-fd2-%d", "python-child-%d", "no-newline-%d"]


@pytest.mark.parametrize("workers", [1, 2])
def test_prints_fd_writes_and_children_go_to_the_task_log(project, workers):
    project.write(task=task_source(NOISY_TASK), variables=VARIABLES,
                  resources=resources(workers))
    result = project.run()
    check_all_succeeded(project, result)
    for x in (1, 2, 3, 4):
        log = project.log(str(x))
        for marker in NOISY_MARKERS:
            assert marker % x in log, "%r missing from the log of %d: %r" % (marker % x, x, log)
        for other in (1, 2, 3, 4):
            if other != x:
                assert "print-%d\n" % other not in log
                assert "no-newline-%d" % other not in log
        for marker in NOISY_MARKERS:
            assert marker % x not in console(result)


# --------------------------------------------------------------------------
# output that looks like protocol messages
# --------------------------------------------------------------------------

FAKE_PROTOCOL_TASK = """
FAKES = [
    '{"op": "result", "id": "x", "status": 0}',
    '{"op": "result", "id": "3", "status": 1, "reason": "forged"}',
    '{"op": "result", "id": "4", "status": 0, "reason": "", "seconds": 0.1}',
    '{"op": "ready", "pid": 1}',
    '{"op": "fatal", "error": "forged fatal"}',
    '{"op": "task", "id": "1", "folder": "/tmp", "log": "/tmp/x.log", "vars": []}',
    'SHUT_DOWN',
]


def task_method(variables, task_folder, log_file):
    for line in FAKES:
        print(line)
        sys.stdout.flush()
        _os.write(1, (line + "\\n").encode())
        _os.write(2, (line + "\\n").encode())
        subprocess.run(["echo", line], check=True)
        subprocess.run(["sh", "-c", 'printf "%s\\\\n" "$0" >&1', line], check=True)
    sys.stdout.write("SHUT_DOWN")   # and one without its newline
    _save(task_folder, variables)
"""


@pytest.mark.parametrize("mode", ["LOG_FILE_ONLY", "CONSOLE_ONLY", "LOG_FILE_AND_CONSOLE"])
def test_output_that_looks_like_protocol_messages(project, mode):
    project.write(task=task_source(FAKE_PROTOCOL_TASK, mode), variables=VARIABLES,
                  resources=resources(1))
    result = project.run()
    check_all_succeeded(project, result)
    assert "forged" not in "".join(project.failed().values())
    if mode != "CONSOLE_ONLY":
        for x in (1, 2, 3, 4):
            log = project.log(str(x))
            assert log.count('{"op": "result", "id": "x", "status": 0}') == 5
            assert log.count("SHUT_DOWN") == 6
    if mode == "LOG_FILE_ONLY":
        assert "SHUT_DOWN" not in console(result)
        assert "forged" not in console(result)


# --------------------------------------------------------------------------
# reading stdin
# --------------------------------------------------------------------------

STDIN_TASK = """
import signal


def _blocked(signum, frame):
    raise RuntimeError("reading stdin blocked")


def task_method(variables, task_folder, log_file):
    signal.signal(signal.SIGALRM, _blocked)
    signal.alarm(10)     # a blocked read fails the task instead of hanging the test
    try:
        text = sys.stdin.read()
        raw = _os.read(0, 10)
        line = sys.stdin.readline()
        child = subprocess.run(["cat"], stdout=subprocess.PIPE, timeout=10).stdout
        head = subprocess.run(["sh", "-c", "head -c 10"], stdout=subprocess.PIPE,
                              timeout=10).stdout
    finally:
        signal.alarm(0)
    print("stdin gave", repr(text), repr(raw), repr(line), repr(child), repr(head))
    _save(task_folder, variables, text=text, raw=raw.decode("latin-1"), line=line,
          child=child.decode("latin-1"), head=head.decode("latin-1"))
"""


@pytest.mark.parametrize("console_input", ["none", "text"])
def test_reading_stdin_gets_end_of_file_and_steals_nothing(project, console_input):
    project.write(task=task_source(STDIN_TASK), variables=VARIABLES, resources=resources(1))
    if console_input == "text":
        # the main process's own stdin (the console) is not the task's either
        result = project.run(input="\n\n")
    else:
        result = project.run()
    check_all_succeeded(project, result)
    for x in (1, 2, 3, 4):
        record = json.loads(project.output(str(x), "result.json"))
        assert (record["text"], record["raw"], record["line"], record["child"],
                record["head"]) == ("", "", "", "", ""), record
        assert "stdin gave" in project.log(str(x))


# --------------------------------------------------------------------------
# C-level output
# --------------------------------------------------------------------------

C_TASK = """
import ctypes

_libc = ctypes.CDLL(None)


def task_method(variables, task_folder, log_file):
    x = variables["x"]
    # printf into libc's buffer (fully buffered: fd 1 is not a terminal), no newline
    _libc.printf(b"c-printf-%d-no-newline", ctypes.c_int(x))
    _libc.puts(("c-puts-%d" % x).encode())
    _save(task_folder, variables)
"""


@pytest.mark.parametrize("mode", ["LOG_FILE_ONLY", "LOG_FILE_AND_CONSOLE"])
def test_c_level_output_lands_in_its_own_task_log(project, mode):
    project.write(task=task_source(C_TASK, mode), variables=VARIABLES, resources=resources(1))
    # PYTHONUNBUFFERED (set in some CI environments) makes Python switch C stdio
    # to unbuffered too; a user's shell usually has it unset, so unset it here.
    result = project.run(env={"PYTHONUNBUFFERED": ""})
    check_all_succeeded(project, result)
    for x in (1, 2, 3, 4):
        log = project.log(str(x))
        assert "c-printf-%d-no-newline" % x in log, "log of %d: %r" % (x, log)
        assert "c-puts-%d" % x in log, "log of %d: %r" % (x, log)
        for other in (1, 2, 3, 4):
            if other != x:
                assert "c-printf-%d-" % other not in log, "log of %d: %r" % (x, log)
                assert "c-puts-%d" % other not in log, "log of %d: %r" % (x, log)
    if mode == "LOG_FILE_ONLY":
        assert "c-printf" not in console(result)
    else:
        for x in (1, 2, 3, 4):
            assert "c-printf-%d-no-newline" % x in console(result)

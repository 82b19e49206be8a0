"""The wire format between the main process and a worker, round-tripped.

Every message is built by the protocol section's encoders and read back by
its decoder, as the other side reads it; nothing else builds or parses a
line.  One real worker process checks that what it sends parses too.
"""

import json
import os
import subprocess
import sys

import pytest

import threadward
from threadward import _decode, _encode, _encode_line, _encode_task, _LineBuffer, _Result


def one_line(data):
    """The line without its newline, checking there is exactly one."""
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    return data[:-1]


def test_every_worker_message_round_trips():
    messages = {
        threadward.OP_READY: {"pid": 4242, "host": "node-7", "gpus": "0,1"},
        threadward.OP_CANCELLED: {"id": "model/é ü/3"},
        threadward.OP_TERMINATED: {},
        threadward.OP_FATAL: {"error": "Traceback (most recent call last):\n  ...\nKeyError"},
        threadward.OP_STATS: {"cpu": 123.5, "rss": 2 ** 40, "gpu": 0},
    }
    for op, fields in messages.items():
        message = _decode(one_line(_encode(op, **fields)))
        assert message == dict(fields, op=op)


def test_the_op_comes_first_on_the_wire():
    # what a person reading a worker's channel (or a log of it) sees first
    assert _encode(threadward.OP_CANCELLED, id="5") == b'{"op": "cancelled", "id": "5"}\n'


@pytest.mark.parametrize("result", [
    _Result("a/1", True, "", 0.25),
    _Result("a/2", False, "ValueError: bad \"value\"\twith a tab", 1.5, load=1.25),
    _Result("a/3", False, "interrupted (SIGTERM)", 0.0, terminated=True),
    _Result("日本/4", True, "", 3.0, load=2.0, terminated=True),
])
def test_results_round_trip(result):
    back = _Result.decode(_decode(one_line(result.encode())))
    assert [getattr(back, name) for name in _Result.__slots__] == \
        [getattr(result, name) for name in _Result.__slots__]


def test_a_result_without_load_leaves_it_out_and_reads_it_as_zero():
    line = one_line(_Result("x", True, "", 1.0).encode())
    assert set(json.loads(line)) == {"op", "id", "status", "reason", "seconds"}
    assert _Result.decode(_decode(line)).load == 0.0


def test_a_task_line_carries_its_variables_as_the_worker_reads_them(tmp_path):
    variables = threadward.VariableSet()
    variables.add_variable(name="model", values=["gpt2", "bert-base"],
                           nicknames=["small", "base"])
    variables.add_variable(name="lr", values=[0.1, 1e-05])
    variables.add_variable(name="note", values=['quote " and \\ and \u00e9'])
    indices = (1, 1, 0)
    task = threadward.Task("base/1e-05/0", indices, str(tmp_path / "base" / "1e-05" / "0"))
    line = one_line(_encode_task(task, variables.texts(indices, threadward.TASK_VARIABLE)))
    message = _decode(line)
    assert message == {
        "op": threadward.OP_TASK, "id": task.task_id, "folder": task.folder,
        "log": task.log_file,
        "vars": [["model", "bert-base", "base"], ["lr", 1e-05, "1e-05"],
                 ["note", 'quote " and \\ and \u00e9', variables.variables[2].nickname(0)]]}


def test_a_retrys_task_line_says_its_attempt(tmp_path):
    variables = threadward.VariableSet()
    variables.add_variable(name="x", values=[1])
    task = threadward.Task("1", (0,), str(tmp_path / "1"))
    texts = list(variables.texts((0,), threadward.TASK_VARIABLE))
    assert "attempt" not in _decode(one_line(_encode_task(task, texts)))
    assert "attempt" not in _decode(one_line(_encode_task(task, texts, 1)))
    assert _decode(one_line(_encode_task(task, texts, 3)))["attempt"] == 3


def test_cancel_and_shut_down_are_bare_words():
    assert _encode_line(threadward.CANCEL) == b"CANCEL\n"
    assert _encode_line(threadward.SHUT_DOWN) == b"SHUT_DOWN\n"


@pytest.mark.parametrize("line", [b"", b"hello from .bashrc", b"[1, 2]", b'"op"',
                                  b'{"id": "no op"}', b'{"op": 3}', b"\xff\xfe"])
def test_lines_that_are_not_messages_are_refused(line):
    with pytest.raises(ValueError):
        _decode(line)


def test_lines_split_anywhere_come_out_whole():
    data = b"".join(_encode(threadward.OP_STATS, cpu=n) for n in range(50))
    buffer, lines = _LineBuffer(), []
    for start in range(0, len(data), 7):
        lines += buffer.feed(data[start:start + 7])
    assert buffer.close() == b""
    assert [_decode(line)["cpu"] for line in lines] == list(range(50))


def test_a_torn_last_line_is_kept_apart():
    buffer = _LineBuffer()
    assert buffer.feed(b'{"op": "ready"}\n{"op": "res') == [b'{"op": "ready"}']
    assert buffer.close() == b'{"op": "res'


def test_a_real_worker_answers_in_this_format(project):
    """A worker process, driven by hand: ready, a task, its result, shut down."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(threadward.__file__))
    worker = subprocess.Popen(
        [sys.executable, threadward.__file__, threadward.WORKER_MODE, project.dir, "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=project.dir, env=env)
    try:
        ready = _decode(worker.stdout.readline().rstrip(b"\n"))
        assert ready["op"] == threadward.OP_READY and ready["pid"] == worker.pid
        variables = threadward.VariableSet()
        variables.add_variable(name="x", values=[7])
        folder = os.path.join(project.outputs, "7")
        task = threadward.Task("7", (0,), folder)
        worker.stdin.write(_encode_task(task, variables.texts((0,), threadward.TASK_VARIABLE)))
        worker.stdin.flush()
        result = _Result.decode(_decode(worker.stdout.readline().rstrip(b"\n")))
        assert (result.task_id, result.succeeded, result.terminated) == ("7", True, False)
        assert result.seconds >= 0
        worker.stdin.write(_encode_line(threadward.SHUT_DOWN))
        worker.stdin.flush()
        assert worker.wait(timeout=60) == 0
        with open(task.log_file) as stream:
            assert "running {'x': 7}" in stream.read()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

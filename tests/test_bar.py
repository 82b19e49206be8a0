"""The progress bar: on a real pseudo-terminal (read back through a small
model of the screen, so the tests see what a user would), and plain lines
with no escape codes wherever stdout is not a terminal.

Tasks wait on gate files (gates/<x>, gates/all), so every step waits for an
event, never for the clock."""

import codecs
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading

import psutil
import pytest

import threadward
from conftest import wait_for

ROWS, COLUMNS = 24, 100
SGR = re.compile(r"\x1b\[[0-9;]*m")

GATED_TASK = """
import os
import time

GATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gates")


def task_method(variables, task_folder, log_file):
    x = variables["x"]
    if x == 1:
        raise ValueError("diverged")
    deadline = time.monotonic() + 120   # a hang guard only
    while not (os.path.exists(os.path.join(GATES, str(x))) or
               os.path.exists(os.path.join(GATES, "all"))):
        if time.monotonic() > deadline:
            raise RuntimeError("gate never opened")
        time.sleep(0.02)
"""
VARIABLES = """
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3, 4])
"""


class Screen:
    """What a VT100-style terminal shows, for the controls threadward writes:
    text (wrapping at the edge), CR, LF, BS, DECSC/DECRC (ESC 7/8), CUP
    (ESC[r;cH), CUU (ESC[nA), EL (ESC[K, ESC[2K), DECSTBM (ESC[t;br, ESC[r);
    SGR colours are ignored.  Lines scrolled off a region at the top row go
    to ``history``, as xterm and tmux keep them."""

    TOKEN = re.compile(r"\x1b\[([0-9;?]*)([@-~])|\x1b([78])|\x1b|([\r\n\b])|([^\x1b\r\n\b]+)")

    def __init__(self, rows, columns):
        self.columns = columns
        self.cells = [[" "] * columns for _ in range(rows)]
        self.history = []
        self.row = self.column = 0
        self.saved = (0, 0)
        self.top, self.bottom = 0, rows - 1

    @property
    def rows(self):
        return len(self.cells)

    def resize(self, rows):
        """Taller: blank rows below; the region resets to the whole screen."""
        self.cells += [[" "] * self.columns for _ in range(rows - self.rows)]
        self.top, self.bottom = 0, rows - 1

    def lines(self):
        return ["".join(row).rstrip() for row in self.cells]

    def feed(self, text):
        for match in self.TOKEN.finditer(text):
            params, final, dec, control, printable = match.groups()
            if final:
                self._csi(params, final)
            elif dec == "7":
                self.saved = (self.row, self.column)
            elif dec == "8":
                self.row, self.column = self.saved
            elif control == "\r":
                self.column = 0
            elif control == "\n":
                self._line_feed()
            elif control == "\b":
                self.column = max(0, self.column - 1)
            elif printable:
                for char in printable:
                    if self.column >= self.columns:
                        self.column = 0
                        self._line_feed()
                    self.cells[self.row][self.column] = char
                    self.column += 1

    def _line_feed(self):
        if self.row == self.bottom:
            if self.top == 0:
                self.history.append("".join(self.cells[0]).rstrip())
            del self.cells[self.top]
            self.cells.insert(self.bottom, [" "] * self.columns)
        elif self.row < self.rows - 1:
            self.row += 1

    def _csi(self, params, final):
        numbers = [int(p) if p.isdigit() else 0 for p in params.split(";")]
        first = numbers[0] or 1
        if final == "H":
            self.row = min(self.rows, first) - 1
            self.column = min(self.columns, (numbers[1:] or [1])[0] or 1) - 1
        elif final == "A":
            floor = self.top if self.row >= self.top else 0
            self.row = max(floor, self.row - first)
        elif final == "K":
            start = 0 if numbers[0] == 2 else self.column
            self.cells[self.row][start:] = [" "] * (self.columns - start)
        elif final == "r":
            self.top = first - 1
            self.bottom = (numbers[1] if len(numbers) > 1 and numbers[1] else self.rows) - 1
            self.row = self.column = 0


class Terminal:
    """`threadward run` on a pseudo-terminal of ROWS x COLUMNS; what it
    writes is kept raw and fed to a Screen."""

    def __init__(self, project, env=None, args=()):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        environment = {"TERM": "xterm-256color"}
        environment.update(env or {})
        self.master = master
        self.process = subprocess.Popen(project.command(*args), stdin=slave, stdout=slave,
                                        stderr=slave, env=project.env(environment),
                                        start_new_session=True)
        os.close(slave)
        self.raw = bytearray()
        self.screen = Screen(ROWS, COLUMNS)
        self._closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:   # EIO: every writer of the slave is gone
                data = b""
            with self._changed:
                if not data:
                    self._closed = True
                    self._changed.notify_all()
                    return
                self.raw += data
                self.screen.feed(decoder.decode(data))
                self._changed.notify_all()

    def type(self, text):
        os.write(self.master, text.encode())

    def text(self):
        return "\n".join(["--- screen"] + self.screen.lines() + ["--- raw", repr(bytes(self.raw))])

    def wait_for(self, predicate, what, timeout=60):
        """Wait until predicate(screen lines) holds (checked at each output)."""
        with self._changed:
            self._changed.wait_for(lambda: predicate(self.screen.lines()) or self._closed,
                                   timeout)
            assert predicate(self.screen.lines()), "%s never showed:\n%s" % (what, self.text())

    def finish(self, timeout=60):
        code = self.process.wait(timeout)
        self._reader.join(10)
        os.close(self.master)
        return code

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def terminal(project):
    """terminal(env=None, args=()) starts the gated sweep on a pseudo-terminal."""
    started = []

    def start(env=None, args=()):
        project.write(task=GATED_TASK, variables=VARIABLES, resources="NUM_WORKERS = 2\n")
        started.append(Terminal(project, env, args))
        return started[-1]
    yield start
    open_gate(project, "all")
    for term in started:
        try:
            term.process.wait(60)
        finally:
            term.kill()


def open_gate(project, name):
    gates = os.path.join(project.dir, "gates")
    os.makedirs(gates, exist_ok=True)
    open(os.path.join(gates, name), "w").close()


def bar_shows(pattern):
    """A predicate: the bottom row is the bar and matches ``pattern``."""
    regex = re.compile(r"^\[[#.]+\]  " + pattern)

    def check(lines):
        return bool(regex.search(lines[-1]))
    return check


def test_the_bar_sits_at_the_bottom_below_failures_and_show_and_typing_is_intact(
        project, terminal):
    term = terminal()
    term.wait_for(bar_shows(r"1/4  1 failed  \S+ tasks/\S+  ETA \d+:\d\d:\d\d  "
                            r"workers: 2 busy, 0 idle$"), "the bar after the first failure")
    lines = term.screen.lines()
    failed = [i for i, line in enumerate(lines) if line.startswith("FAILED 1: ValueError: diverged")]
    assert failed and failed[0] < ROWS - 1, term.text()
    assert sum("1/4" in line for line in lines) == 1, term.text()   # no stale copy above
    assert re.search(r"^running 4 tasks on 2 workers", lines[failed[0] - 1]), term.text()
    assert SGR.search(term.raw.decode()), "the bar is coloured unless NO_COLOR is set"

    # Half a command typed, then the bar is redrawn (task 2 ends): the
    # echoed text stays where it is, and the rest of the line joins it.
    term.type("sh")
    term.wait_for(lambda lines: "sh" in lines[failed[0] + 1:-1], "the echo of 'sh'")
    open_gate(project, "2")
    term.wait_for(bar_shows(r"2/4  1 failed  "), "the bar after task 2")
    term.type("ow\r")
    term.wait_for(lambda lines: any(line.startswith("tasks: 1 succeeded, 1 failed")
                                    for line in lines), "show's table")
    lines = term.screen.lines()
    typed = lines.index("show")
    assert typed == failed[0] + 1, term.text()
    assert re.match(r"elapsed \S+   ETA \d+:\d\d:\d\d   per task", lines[typed + 1]), term.text()
    assert any(re.match(r"\s*ID\s+PID\b", line) for line in lines[typed:]), term.text()
    assert bar_shows(r"2/4  ")(lines), term.text()

    open_gate(project, "all")
    assert term.finish() == 1, term.text()   # one task failed
    lines = term.screen.lines()
    assert not any(re.match(r"^\[[#.]+\]  ", line) for line in lines), term.text()
    assert any(re.match(r"done in \S+: 3 succeeded, 1 failed$", line) for line in lines), \
        term.text()
    # The whole screen scrolls again: the region is reset.
    assert (term.screen.top, term.screen.bottom) == (0, ROWS - 1), term.text()


def test_after_a_resize_the_bar_is_on_the_new_bottom_row(project, terminal):
    term = terminal()
    term.wait_for(bar_shows(r"1/4  1 failed  "), "the bar")
    taller = ROWS + 6
    fcntl.ioctl(term.master, termios.TIOCSWINSZ, struct.pack("HHHH", taller, COLUMNS, 0, 0))
    with term._changed:
        term.screen.resize(taller)
    term.process.send_signal(signal.SIGWINCH)   # it has no controlling terminal to send it
    term.wait_for(lambda lines: bar_shows(r"1/4  ")(lines[-1:]), "the bar on the new bottom row")
    open_gate(project, "all")
    assert term.finish() == 1, term.text()
    assert term.screen.lines()[-1] == "", term.text()
    assert (term.screen.top, term.screen.bottom) == (0, taller - 1), term.text()


def test_ctrl_z_gives_the_whole_screen_back_and_fg_brings_the_bar_back(project, terminal):
    term = terminal()
    term.wait_for(bar_shows(r"1/4  1 failed  "), "the bar")
    term.process.send_signal(signal.SIGTSTP)   # what Ctrl-Z sends
    term.wait_for(lambda lines: lines[-1] == "" and
                  (term.screen.top, term.screen.bottom) == (0, ROWS - 1),
                  "the screen given back to the shell")
    process = psutil.Process(term.process.pid)
    wait_for(lambda: process.status() == psutil.STATUS_STOPPED)
    term.process.send_signal(signal.SIGCONT)   # what `fg` sends
    term.wait_for(lambda lines: bar_shows(r"1/4  1 failed  ")(lines) and
                  (term.screen.top, term.screen.bottom) == (0, ROWS - 2), "the bar again")
    open_gate(project, "all")
    assert term.finish() == 1, term.text()


def test_no_color_leaves_out_colour_codes_but_keeps_the_bar(project, terminal):
    term = terminal(env={"NO_COLOR": "1"})
    term.wait_for(bar_shows(r"1/4  1 failed  "), "the bar")
    open_gate(project, "all")
    assert term.finish() == 1, term.text()
    assert b"\x1b[1;%dr" % (ROWS - 1) in term.raw, term.text()   # the bar was on
    assert not SGR.search(term.raw.decode()), term.text()


def test_term_dumb_gets_plain_lines(project, terminal):
    term = terminal(env={"TERM": "dumb"})
    open_gate(project, "all")
    assert term.finish() == 1, term.text()
    out = term.raw.decode()
    assert "\x1b" not in out, term.text()
    assert re.search(r"\[\S+\] 4/4 done, 1 failed, ETA", out), term.text()


def test_through_a_pipe_plain_lines_no_carriage_returns_no_escapes(project):
    project.write(task=GATED_TASK, variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    open_gate(project, "all")
    result = project.run(input="show\nhelp\n")
    assert result.returncode == 1, result.stdout + result.stderr
    for stream in (result.stdout, result.stderr):
        assert "\r" not in stream and "\x1b" not in stream, repr(stream)
    assert "FAILED 1: ValueError: diverged" in result.stdout
    assert re.search(r"^\[\S+\] 4/4 done, 1 failed, ETA 0:00:00$", result.stdout, re.M)
    assert re.search(r"^elapsed \S+   ETA ", result.stdout, re.M), result.stdout


def test_the_bar_fits_the_width_and_reads_the_one_eta(tmp_path, monkeypatch):
    """The bar, `show` and status.json count down one estimate (see
    test_one_eta_counts_down_between_results); the bar never wraps."""
    clock = [1000.0]
    monkeypatch.setattr(threadward.time, "monotonic", lambda: clock[0])
    ledger = threadward._Ledger(str(tmp_path))
    ledger.total = 10
    ledger.open(fresh=True)
    clock[0] += 10
    for task_id in "abcd":
        ledger.record(task_id, True, "", 2.0)
    ledger.record("e", False, "boom", 2.0)
    clock[0] += 2
    line = ledger.bar(120, busy=3, idle=1)   # 30 cells: 12 succeeded, 3 failed
    assert line == "[###############...............]  5/10  1 failed  25.0 tasks/min  " \
                   "ETA 0:00:08  workers: 3 busy, 1 idle"
    assert "ETA 0:00:08" in ledger.overview()[0]
    coloured = ledger.bar(120, busy=3, idle=1, colour=True)
    assert SGR.sub("", coloured) == line and "\x1b[31m1 failed\x1b[0m" in coloured
    for width in (79, 60, 40, 29):
        assert len(ledger.bar(width, busy=3, idle=1)) <= width
    assert "[" not in ledger.bar(40, busy=3, idle=1)   # too narrow for a bar: the figures
    ledger.close()


def test_a_tiny_terminal_or_no_terminal_gets_no_bar():
    size = os.terminal_size((100, 24))

    class Out:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def fileno(self):
            raise OSError("no fd")

    assert threadward._StatusBar.for_terminal(Out(False), None, {"TERM": "xterm"}) is None
    assert threadward._StatusBar.for_terminal(Out(True), None, {"TERM": "xterm"}) is None
    assert threadward._StatusBar._fits(size.lines, size.columns)
    assert not threadward._StatusBar._fits(3, 100) and not threadward._StatusBar._fits(24, 20)

"""`threadward report`: the HTML page of a run, from real runs of the CLI.

The page is parsed (html.parser) and its figures compared with what the
run itself produced: the events, files the tasks and converters wrote.  The
browser tests at the end open it in headless Chromium (tests/browser.py).
"""

import html.parser
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse

import pytest

import threadward
from browser import Browser, chromium_path
from conftest import ROOT, TASK_IMPORTS_WAIT_FOR, Project, started, wait_for
import test_events
from test_events import events, of_kind

needs_browser = pytest.mark.skipif(
    chromium_path() is None, reason="no Chromium: `make test` installs Debian's chromium "
                                    "package where it runs as root with apt-get")


class Element:
    """A parsed element: its tag, attributes, and children (elements and text)."""

    __slots__ = ("tag", "attrs", "children")

    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.children = tag, dict(attrs), []

    def elements(self):
        return [child for child in self.children if isinstance(child, Element)]

    def all(self, tag=None, cls=None):
        """Every element below this one (document order) with ``tag`` and class ``cls``."""
        found = []
        for child in self.elements():
            if (tag is None or child.tag == tag) and (
                    cls is None or cls in child.attrs.get("class", "").split()):
                found.append(child)
            found += child.all(tag, cls)
        return found

    def content(self):
        """The text of this element and everything below it, in order."""
        return "".join(child if isinstance(child, str) else child.content()
                       for child in self.children)

    def title(self):
        """The text of its SVG <title> child (the hover text)."""
        return next((child.content() for child in self.elements() if child.tag == "title"),
                    None)


class Parser(html.parser.HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.root = Element("document", ())
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, attrs)
        self.stack[-1].children.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, attrs))

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, "</%s> closes <%s>" % (tag, self.stack[-1].tag)
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


class Page:
    """The parsed report and its sections' tables."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as stream:
            self.source = stream.read()
        parser = Parser()
        parser.feed(self.source)
        parser.close()
        assert parser.stack == [parser.root], "unclosed: %s" % [e.tag for e in parser.stack]
        self.root = parser.root
        self.body = self.root.all("body")[0]

    def text(self):
        return " ".join(self.body.content().split())

    def after(self, heading, tag):
        """The first <tag> after the <h2>/<h3> ``heading``."""
        seen = False
        for element in self.body.all():
            if element.tag in ("h2", "h3") and element.content() == heading:
                seen = True
            elif seen and element.tag == tag:
                return element
        raise AssertionError("no <%s> after %r" % (tag, heading))

    def table_after(self, heading):
        """The rows (cell texts) of the first table after the <h2>/<h3> ``heading``."""
        return [[" ".join(cell.content().split()) for cell in row.elements()]
                for row in self.after(heading, "table").all("tr")]

    def bars(self):
        return self.body.all("g", "task")


# test_events' sweep, where a/1 fails once, with b/2 failing both attempts;
# and each task sleeps 0.3 s: a bar of its own unless the run took over
# 165 s (REPORT_WIDTH px span the run; a bar is drawn alone from
# REPORT_MIN_BAR px).
SWEEP_TASK = test_events.SWEEP_TASK.replace("def task_method(", "def counted_task(") + """
import time


def task_method(variables, task_folder, log_file):
    time.sleep(0.3)
    counted_task(variables, task_folder, log_file)
    if (variables["model"], variables["seed"]) == ("loaded b", 2):
        raise RuntimeError("out of patience")
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 models x 3 seeds on 2 workers: a/1 fails once and succeeds on its
    retry, b/2 fails both attempts.  (project, the run's output, the page.)"""
    project = Project(tmp_path_factory.mktemp("sweep"))
    project.write(task=SWEEP_TASK, variables=test_events.SWEEP_VARIABLES,
                  resources="NUM_WORKERS = 2\n")
    result = project.run()
    assert result.returncode == 1, result.stdout + result.stderr
    return project, result.stdout, Page(os.path.join(project.config, "report.html"))


def test_every_run_writes_the_report_and_names_it_last(sweep):
    project, output, page = sweep
    # named as the summary names files: from the project's directory, where it runs
    assert output.splitlines()[-1] == "report: threadward/report.html"
    assert os.path.isfile(os.path.join(project.config, "report.html"))
    text = page.text()
    assert "5 succeeded, 1 failed, 0 not run, 2 failed attempts run again, of 6 tasks" in text
    assert "finished" in text
    # the settings, folded, as they are written in Python
    settings = {row.elements()[0].content(): " ".join(row.elements()[1].content().split())
                for row in page.body.all("details")[0].all("tr")[1:]}
    assert (settings["RETRIES"], settings["SIGTERM_GRACE"], settings["OUTPUT_MODE"],
            settings["TASK_TIMEOUT"]) == ("1", 'float("inf")', "'LOG_FILE_ONLY'", "None")


def test_the_timeline_has_a_lane_per_worker_and_a_bar_per_attempt(sweep):
    project, _, page = sweep
    record = events(project)
    ends = of_kind(record, "task")
    assert len(ends) == 8
    timeline = page.body.all("svg", "timeline")[0]
    assert len(timeline.all("rect", "lane")) == 2
    labels = [text.children[0] for text in timeline.all("text")
              if text.children[0].startswith("worker ")]
    assert labels == ["worker 0", "worker 1"]   # a row each: none replaced another
    bars = page.bars()
    assert len(bars) == len(ends)   # 8 short-ish tasks in a short run: each its own bar
    titles = sorted(bar.title().split("\n")[0] for bar in bars)
    assert titles == sorted(end["id"] for end in ends)
    red = [bar for bar in bars if bar.all("rect")[0].attrs["fill"] == threadward.REPORT_FAILED]
    assert sorted(bar.title().split("\n")[0] for bar in red) == ["a/1", "b/2", "b/2"]
    failed_once = next(bar.title() for bar in red if bar.title().startswith("a/1"))
    assert "model=a  seed=1" in failed_once and "ValueError: diverged" in failed_once
    assert "attempt 1: retrying" in failed_once
    # the tasks that loaded have a dark part, as long as their load
    loading = [bar for bar in bars if len(bar.all("rect")) == 2]
    assert len(loading) == sum(1 for end in ends if end.get("converted"))
    # a grey line each for starting and, told to stop, shutting down; the
    # idle lane between them ends where the shutting down begins
    for kind, doing in (("starting", "starting"), ("stopping", "shutting down")):
        lines = timeline.all("line", kind)
        assert sorted(line.title().split(":")[0] for line in lines) == [
            "worker 0 %s" % doing, "worker 1 %s" % doing]
    for lane, line in zip(timeline.all("rect", "lane"), timeline.all("line", "stopping")):
        end = float(lane.attrs["x"]) + float(lane.attrs["width"])
        assert abs(end - float(line.attrs["x1"])) < 0.2 and \
            float(line.attrs["x2"]) > float(line.attrs["x1"])
    # the two workers' markers: started (and why), exited (and why)
    marks = [text.title() for text in timeline.all("text", "marker")]
    assert marks == ["worker 0 started (start)", "worker 0 exited: shut down",
                     "worker 1 started (start)", "worker 1 exited: shut down"]


def test_the_tables_count_what_the_run_did(sweep):
    project, _, page = sweep
    with open(os.path.join(project.dir, "calls", "model")) as stream:
        calls = len(stream.read().split())
    loads = page.table_after("Loads")
    assert loads[0] == ["variable", "converter calls", "P", "P + W - 1", "calls / bound"]
    # 2 models, 2 workers: P + W - 1 = 3
    assert loads[1] == ["model", str(calls), "2", "3", "%.2f" % (calls / 3)]
    assert loads[2][:2] == ["seed", "no converter"]

    # values in the order the run reached them: (value, attempts, failed)
    by_model = page.table_after("model")
    assert sorted((row[0], row[1], row[-1]) for row in by_model[1:]) == [
        ("a", "4", "1"), ("b", "4", "2")]
    by_seed = page.table_after("seed")
    assert sorted(row[:2] for row in by_seed[1:]) == [["0", "2"], ["1", "3"], ["2", "3"]]

    workers = page.body.all("table")[0].all("tr")   # the header's table of workers
    tasks = [int(row.elements()[6].content()) for row in workers[1:]]
    assert sum(tasks) == 8 and len(tasks) == 2


def test_failures_link_each_task_log(sweep):
    project, _, page = sweep
    rows = page.table_after("Failures")
    assert rows[0] == ["task (its task.log)", "outcome", "attempts", "reason"]
    # the failed first, then those a retry saved
    assert rows[1:] == [["b/2", "failed", "2", "RuntimeError: out of patience"],
                        ["a/1", "succeeded on attempt 2", "2", "ValueError: diverged"]]
    links = {a.content(): a.attrs["href"] for a in page.body.all("a")}
    assert sorted(links) == ["a/1", "b/2"]
    for task_id, href in links.items():
        path = os.path.join(project.config, urllib.parse.unquote(href))
        assert path == os.path.join(project.outputs, task_id, "task.log")
    with open(os.path.join(project.config, urllib.parse.unquote(links["b/2"]))) as stream:
        assert "RuntimeError: out of patience" in stream.read()   # its last attempt's log


def test_the_page_needs_nothing_from_outside(sweep):
    _, _, page = sweep
    source = page.source
    for tag in ("script", "link", "img", "iframe", "object", "embed"):
        assert not page.root.all(tag), tag
    assert "@import" not in source and "@font-face" not in source
    urls = re.findall(r"""(?:href|src)\s*=\s*["']([^"']*)""", source)
    assert urls and all(not re.match(r"[a-z]+:", url) for url in urls)   # relative only
    assert set(re.findall(r"url\(([^)]*)\)", source)) == set()   # no bar still runs
    outside = set(re.findall(r"https?://[^\s\"'<>]+", source))
    assert outside == {"http://www.w3.org/2000/svg"}   # the SVG namespace: a name, not fetched


def test_report_command_writes_where_told_and_prints_the_path(sweep, tmp_path):
    project, _, _ = sweep
    target = str(tmp_path / "elsewhere.html")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "threadward.py"), "report",
                             project.dir, "-o", target], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.path.abspath(result.stdout.strip()) == target
    page = Page(target)
    assert len(page.bars()) == 8
    # from elsewhere, the links to the logs still lead to them
    for anchor in page.body.all("a"):
        assert os.path.isfile(os.path.join(str(tmp_path),
                                           urllib.parse.unquote(anchor.attrs["href"])))
    assert threadward.report(project.dir, target) == target


def test_report_of_no_project_or_no_run_is_an_error(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "threadward.py"), "report"]
    result = subprocess.run(command + [str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 2 and "has no threadward/ folder" in result.stderr
    result = subprocess.run(command + [str(tmp_path / "typo")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 2 and "typo does not exist; give the project directory" \
        in result.stderr
    subprocess.run([sys.executable, os.path.join(ROOT, "threadward.py"), "init",
                    str(tmp_path)], stdout=subprocess.PIPE, check=True, timeout=60)
    result = subprocess.run(command + [str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 2 and "records no run yet" in result.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "threadward", "report.html"))


GATED_TASK = TASK_IMPORTS_WAIT_FOR + """
import os
GATE = %r


def task_method(variables, task_folder, log_file):
    wait_for(lambda: os.path.exists(GATE), timeout=300)
"""


def test_report_during_a_run_shows_what_runs_now(project):
    gate = os.path.join(project.dir, "gate")
    project.write(task=GATED_TASK % gate, resources="NUM_WORKERS = 2\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="x", values=[1, 2, 3, 4])
""")
    with started(project) as process:
        wait_for(lambda: os.path.exists(os.path.join(project.queue, "events.jsonl")) and len(
            of_kind(events(project), "start")) == 2)
        path = threadward.report(project.dir)
        page = Page(path)
        text = page.text()
        assert "running; this page shows it as of" in text
        assert "0 succeeded, 0 failed, 2 to run, 2 running, of 4 tasks" in text
        running = page.body.all("g", "running")
        assert len(running) == 2
        # each its value's colour under the hatching
        assert [[rect.attrs["fill"] for rect in bar.all("rect")][-1] for bar in running] == \
            ["url(#running)"] * 2
        assert sorted(bar.title().split("\n")[0] for bar in running) == ["1", "2"]
        open(gate, "w").close()
        process.communicate(timeout=120)
    assert process.returncode == 0
    page = Page(os.path.join(project.config, "report.html"))
    assert "4 succeeded, 0 failed, 0 not run" in page.text()
    assert not page.body.all("g", "running")


def test_resources_draw_a_line_per_worker_from_the_samples(project):
    gate = os.path.join(project.dir, "gate")
    project.write(task=GATED_TASK % gate, resources="NUM_WORKERS = 2\n")
    with started(project) as process:
        wait_for(lambda: os.path.exists(os.path.join(project.queue, "events.jsonl")) and len(
            of_kind(events(project), "sample")) >= 2)
        open(gate, "w").close()
        process.communicate(timeout=120)
    assert process.returncode == 0
    samples = of_kind(events(project), "sample")
    page = Page(os.path.join(project.config, "report.html"))
    ram = page.after("RAM (RSS of the worker and its children)", "svg")
    lines = ram.all("polyline")
    assert sorted(line.title() for line in lines) == ["worker 0", "worker 1"]
    # a point per sample that named the worker (each in its own pixel column here)
    for line in lines:
        worker = line.title().split()[1]
        named = [sample for sample in samples if worker in sample["workers"]]
        assert len(line.attrs["points"].split()) == len(named)
    top = max(figures["rss"] for sample in samples for figures in sample["workers"].values())
    assert threadward._format_bytes(top) in ram.content()   # the axis is the largest reading


def test_a_run_killed_without_its_end_line_reads_as_gone(project):
    gate = os.path.join(project.dir, "gate")
    project.write(task=GATED_TASK % gate, resources="NUM_WORKERS = 1\n")
    with started(project) as process:
        wait_for(lambda: os.path.exists(os.path.join(project.queue, "events.jsonl")) and
                 of_kind(events(project), "start"))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    # and a torn last line, as a crash mid-write leaves
    with open(os.path.join(project.queue, "events.jsonl"), "a") as stream:
        stream.write('{"event": "task", "run": "x", "ti')
    page = Page(threadward.report(project.dir))
    text = page.text()
    assert "ended without its last line: the main process (%d) is gone" % process.pid in text
    assert "1 never recorded as ended" in text
    assert len(page.bars()) == 1   # the task it was running, drawn to the record's last write
    workers = page.body.all("table")[0].all("tr")
    assert workers[1].elements()[-1].content() == "lost with the run"


def test_interrupted_attempts_are_told_apart_from_failures(project):
    gate = os.path.join(project.dir, "gate")   # never opened: SIGTERM ends the task
    project.write(task=GATED_TASK % gate + "SIGTERM_GRACE = 0\n",
                  resources="NUM_WORKERS = 1\n")
    with started(project) as process:
        wait_for(lambda: os.path.exists(os.path.join(project.queue, "events.jsonl")) and
                 of_kind(events(project), "start"))
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    page = Page(os.path.join(project.config, "report.html"))
    text = page.text()
    assert "1 failed (1 interrupted: they run again)" in text
    assert "interrupted (runs again)" in page.body.all("p", "legend")[0].content()
    # its bar, or (ended within 2 px of a slow start) the block of it alone
    shapes = [bar.all("rect")[0] for bar in page.bars()] + page.body.all("rect", "tasks")
    shape, = shapes
    assert shape.attrs["fill"] == threadward.REPORT_INTERRUPTED
    assert page.table_after("Failures")[1][1] == "interrupted (runs again)"
    # the value it ran with is not blamed: no failed attempt in its row
    assert page.table_after("Task time by variable value")[0][-1] == "failed attempts"
    value_row, = page.table_after("Task time by variable value")[1:]
    assert value_row[1] == "1" and value_row[-1] == "0", value_row


def test_a_dead_worker_and_its_replacement_are_marked(project):
    project.write(task="""
import os

RETRIES = 1


def task_method(variables, task_folder, log_file):
    if variables["x"] == 1 and not os.path.exists(os.path.join(task_folder, "died")):
        open(os.path.join(task_folder, "died"), "w").close()
        os._exit(3)
""", resources="NUM_WORKERS = 1\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    page = Page(os.path.join(project.config, "report.html"))
    marks = [text.title() for text in page.body.all("text", "marker")]
    assert "worker 0 exited: worker 0 exited with code 3" in marks
    assert "worker 1 started (replace of worker 0)" in marks
    workers = page.body.all("table")[0].all("tr")
    started_as = [row.elements()[4].content() for row in workers[1:]]
    assert started_as == ["start", "replace of worker 0"]
    # one row: the replacement draws where the worker it replaced did
    timeline = page.body.all("svg", "timeline")[0]
    rows = {rect.attrs["y"] for rect in timeline.all("rect", "lane")}
    assert len(timeline.all("rect", "lane")) == 2 and len(rows) == 1
    label = next(text for text in timeline.all("text") if text.children[0].startswith("worker"))
    assert label.title() == "workers 0, 1, one after another"


def test_ids_that_do_not_spell_the_values_are_read_from_the_task_list(project):
    project.write(variables="""
TASK_FOLDER_LOCATION = "VARIABLE_UNDERSCORE"


def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=["big_one", "small"])
    variable_set.add_variable(name="seed", values=[1, 2])
""")
    assert project.run().returncode == 0
    page = Page(os.path.join(project.config, "report.html"))
    assert sorted(row[:2] for row in page.table_after("model")[1:]) == [["big_one", "2"],
                                                                        ["small", "2"]]
    assert sorted(row[:2] for row in page.table_after("seed")[1:]) == [["1", "2"], ["2", "2"]]


def test_a_report_that_cannot_be_written_is_said_and_the_exit_code_stays(project):
    os.makedirs(os.path.join(project.config, "report.html"))
    result = project.run()
    assert result.returncode == 0
    assert "could not write the report" in result.stdout + result.stderr
    assert len(project.successful()) == 3


def counted_in_blocks(page):
    """The attempts the blocks of short ones hold: a block of one shows
    that attempt's own hover text (its ID first), of more their count."""
    counted = 0
    for block in page.body.all("rect", "tasks"):
        title = block.title()
        many = re.match(r"(\d+) tasks between \+(.+) and \+(.+), \d+ % busy", title)
        if many:
            assert int(many.group(1)) > 1 and many.group(2) != many.group(3), title
            counted += int(many.group(1))
        else:
            assert re.match(r"\d+/\d+\n.*\n.* on worker \d, attempt 1: ", title), title
            counted += 1
    return counted


def test_many_short_tasks_are_drawn_in_bins_that_count_them_all(project):
    project.write(task="""
def task_method(variables, task_folder, log_file):
    pass
""", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=list(range(4)))
    variable_set.add_variable(name="seed", values=list(range(500)))
""")
    assert project.run().returncode == 0
    page = Page(os.path.join(project.config, "report.html"))
    blocks = page.body.all("rect", "tasks")
    assert blocks
    assert counted_in_blocks(page) + len(page.bars()) == 2000
    assert len(blocks) <= 2 * threadward.REPORT_WIDTH // threadward.REPORT_MIN_BAR
    assert "are drawn together: a block per 2 px" in page.text()


# -- a 100,000-task sweep -----------------------------------------------------

@pytest.fixture(scope="module")
def big_sweep(tmp_path_factory):
    """100 x 1,000 no-op tasks on 2 workers, ten of them failing; on tmpfs
    where there is one (the folders are 100,000 files)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else None
    import tempfile
    folder = tempfile.mkdtemp(prefix="threadward-big-", dir=base) if base else \
        str(tmp_path_factory.mktemp("big"))
    project = Project(folder)
    project.write(task="""
def task_method(variables, task_folder, log_file):
    if variables["seed"] == 777 and variables["model"] % 10 == 3:
        raise ValueError("seed 777 fails")
""", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="model", values=list(range(100)))
    variable_set.add_variable(name="seed", values=list(range(1000)))
""")
    result = project.run(timeout=1800)
    assert result.returncode == 1, result.stderr
    yield project
    shutil.rmtree(folder, ignore_errors=True)


def test_a_100000_task_report_stays_small_and_counts_every_task(big_sweep):
    path = os.path.join(big_sweep.config, "report.html")
    assert os.path.getsize(path) < 3 << 20
    page = Page(path)
    assert "99990 succeeded, 10 failed, 0 not run, of 100000 tasks" in page.text()
    assert counted_in_blocks(page) + len(page.bars()) == 100000
    assert len(page.table_after("Failures")) == 11
    model = page.table_after("model")
    assert len(model) == 1 + threadward.REPORT_VALUES   # the slowest 30 of 100 values
    assert "and 70 more values" in page.text()


# -- in a real browser ----------------------------------------------------------

LANES = "document.querySelectorAll('svg.timeline rect.lane').length"


@needs_browser
def test_the_report_opens_in_chromium_with_its_lanes_and_no_errors(sweep, tmp_path):
    project, _, page = sweep
    path = os.path.join(project.config, "report.html")
    with Browser() as browser:
        shown = browser.open(path)
        assert shown.errors == []
        assert shown.requests == []
        assert shown.evaluate(LANES) == 2
        assert shown.evaluate("document.querySelectorAll('svg.timeline g.task').length") == 8
        # the bars are drawn where they should be: inside the timeline, with a size
        box = shown.evaluate("""(() => {
            const r = document.querySelector('svg.timeline g.task rect').getBoundingClientRect();
            const t = document.querySelector('svg.timeline').getBoundingClientRect();
            return [r.width > 0, r.height > 0, r.left >= t.left, r.right <= t.right];
        })()""")
        assert box == [True, True, True, True]
        # hovering the first failed bar shows its hover text
        shown.evaluate("""document.querySelector("svg.timeline g.task rect[fill='%s']")
                          .parentNode.id = 'probe'""" % threadward.REPORT_FAILED)
        first_red = next(bar.title() for bar in page.bars()
                         if bar.all("rect")[0].attrs["fill"] == threadward.REPORT_FAILED)
        assert shown.hover("#probe") == first_red
        shot = os.environ.get("THREADWARD_REPORT_SCREENSHOT") or str(tmp_path / "report.png")
        shown.screenshot(shot)
    with open(shot, "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


@needs_browser
def test_a_100000_task_report_opens_in_chromium(big_sweep):
    path = os.path.join(big_sweep.config, "report.html")
    with Browser() as browser:
        shown = browser.open(path)
        assert shown.errors == [] and shown.requests == []
        assert shown.evaluate(LANES) == 2
        assert shown.evaluate("document.querySelectorAll('svg.timeline rect.tasks').length") \
            > 100


def test_block_times_have_the_decimals_their_width_needs():
    # a 2-px block of a 26 s run is 0.047 s wide: "+17.3 s and +17.3 s" told nothing
    assert threadward._offset_text(17.3012, 0.047) == "17.30 s"
    assert threadward._offset_text(17.35, 0.18) == "17.4 s"
    assert threadward._offset_text(75.5, 0.5) == "0:01:15.5"
    assert threadward._offset_text(119.99, 0.18) == "0:02:00.0"
    assert threadward._offset_text(3.2, 2) == "3.2 s"

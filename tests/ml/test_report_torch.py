"""The report of a real PyTorch sweep: models with persistent DataLoader
workers (processes) on two threadward workers, one seed failing once and
retried.  What the page says is checked against what the run did."""

import json
import os

import pytest

import threadward
from conftest import Project
from workloads import check_succeeded, need_libraries

need_libraries()

from browser import Browser   # noqa: E402  (after the skip: tests/ is on the path)
from test_events import events, of_kind   # noqa: E402
from test_report import LANES, Page, needs_browser   # noqa: E402

VARIABLES = """
import os
import torch
from torch.utils.data import DataLoader, TensorDataset

CALLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "calls")


def setup_variable_set(variable_set):
    variable_set.add_variable(name="width", values=[8, 64], nicknames=["small", "big"])
    variable_set.add_variable(name="seed", values=[0, 1, 2])


def width_to_value(string_value, nickname):
    with open(CALLS, "a") as stream:
        stream.write(nickname + "\\n")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, int(string_value)), torch.nn.ReLU(),
                              torch.nn.Linear(int(string_value), 1))
    data = TensorDataset(torch.randn(256, 16), torch.randn(256, 1))
    loader = DataLoader(data, batch_size=32, num_workers=2, persistent_workers=True)
    return net, loader
"""

# Each task trains until the main process has sampled its worker while it
# ran (so every worker's samples include its DataLoader processes), and
# says what its loader's processes and its own process held then.
TASK = """
import json
import os
import psutil
import torch

RETRIES = 1
EVENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "task_queue", "events.jsonl")


def samples():
    with open(EVENTS) as stream:
        return stream.read().count('"event": "sample"')


def task_method(variables, task_folder, log_file):
    net, loader = variables["width"]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    before = None   # counted once an epoch has started the loader's processes
    while before is None or samples() == before:
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
        before = samples() if before is None else before
    loaders = [psutil.Process(w.pid) for w in loader._iterator._workers]
    attempt = os.path.join(task_folder, "attempted")
    if variables["seed"] == 1 and not os.path.exists(attempt):
        open(attempt, "w").close()
        raise FloatingPointError("loss is nan")
    return {"own_rss": psutil.Process().memory_info().rss,
            "loader_rss": sum(p.memory_info().rss for p in loaders)}
"""


@pytest.fixture(scope="module")
def torch_sweep(tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("torch"))
    project.write(task=TASK, variables=VARIABLES, resources="NUM_WORKERS = 2\n")
    result = project.run(timeout=600)
    check_succeeded(project, result, 6)
    return project, result


def test_the_report_of_a_torch_sweep_shows_its_loads_retries_and_dataloader_memory(
        torch_sweep):
    project, result = torch_sweep
    assert result.stdout.splitlines()[-1] == "report: threadward/report.html"
    page = Page(os.path.join(project.config, "report.html"))
    assert "6 succeeded, 0 failed, 0 not run, 2 failed attempts run again, of 6 tasks" \
        in page.text()

    # loads: what the converter did, as often as it did it
    with open(os.path.join(project.dir, "calls")) as stream:
        calls = stream.read().split()
    assert page.table_after("Loads")[1][:2] == ["width", str(len(calls))]
    assert 2 <= len(calls) <= 3   # P + W - 1 with P = 2, W = 2

    # the retried attempts are red bars, with their reason on hover
    red = [bar.title() for bar in page.bars()
           if bar.all("rect")[0].attrs["fill"] == threadward.REPORT_FAILED]
    assert sorted(title.split("\n")[0] for title in red) == ["big/1", "small/1"]
    assert all("FloatingPointError: loss is nan" in title for title in red)

    # resources: a worker's RAM is its tree's, DataLoader processes included;
    # its first CPU reading is of a worker that was busy
    record = events(project)
    samples = of_kind(record, "sample")
    for end in of_kind(record, "task"):
        if end["status"] != "succeeded":
            continue
        with open(os.path.join(project.outputs, end["id"], "result.json")) as stream:
            held = json.load(stream)
        during = [s["workers"][str(end["worker"])]["rss"] for s in samples
                  if str(end["worker"]) in s["workers"]]
        assert max(during) > held["own_rss"] + held["loader_rss"] / 2, (end["id"], held)
    first = {}
    for sample in samples:
        for worker, figures in sample["workers"].items():
            first.setdefault(worker, figures["cpu"])
    assert sorted(first) == ["0", "1"] and all(cpu > 0 for cpu in first.values()), first

    # each worker's lane ends in its shutting down (the loaders' teardown)
    timeline = page.body.all("svg", "timeline")[0]
    assert len(timeline.all("line", "stopping")) == 2


@needs_browser
def test_the_torch_sweeps_report_opens_with_no_errors(torch_sweep):
    project, _ = torch_sweep
    with Browser() as browser:
        shown = browser.open(os.path.join(project.config, "report.html"))
        assert shown.errors == [] and shown.requests == []
        assert shown.evaluate(LANES) == 2
        assert shown.evaluate("document.querySelectorAll('svg.timeline g.task').length") == 8

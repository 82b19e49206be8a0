"""A headless Chromium for tests, driven over the DevTools protocol with the standard library.

A test renders a self-contained HTML file (threadward's report.html) in a real
browser and checks what happened::

    with Browser() as browser:
        page = browser.open("report.html")
        assert page.errors == [] and page.requests == []
        assert page.evaluate("document.querySelectorAll('svg rect').length") > 0
        page.screenshot("report.png")
        assert page.hover("svg rect") == "task 3: 1.2 s"

How it talks to Chromium::

    test --call()--> Browser --JSON + NUL--> fd 3 ----> chromium --headless=new
              <----- Browser <--JSON + NUL-- fd 4 <----       --remote-debugging-pipe
                        |
                        +-- events, by sessionId --> Page: errors, requests, loaded

* ``--remote-debugging-pipe``: Chromium reads commands from its fd 3 and writes
  answers and events to its fd 4, each message JSON ended by a NUL byte.  The
  two pipe ends are moved to fds 3 and 4 by a one-line Python that then execs
  Chromium, because subprocess can pass fds but not renumber them.
* One thread: every wait (an answer, the load event) reads the pipe through a
  selector with a deadline, so a hung browser fails the test with a message
  naming what was awaited and the end of Chromium's stderr, instead of hanging.
* Events are handed to the Page of their session as they are read, so
  ``page.errors`` and ``page.requests`` grow whenever the pipe is read (during
  ``open``, ``evaluate``, ``hover`` and ``screenshot``).
* Every page is cut off from the network (``--host-resolver-rules``): a request
  is still recorded in ``page.requests`` but fails at once.

Public API: ``chromium_path()``, ``Browser``, ``Page``, ``BrowserError``.
"""

import base64
import fcntl
import json
import os
import pathlib
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

__all__ = ["chromium_path", "Browser", "Page", "BrowserError"]

#: Names looked up on PATH, in order, then the fixed paths after them.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_PATHS = ("/usr/bin/chromium",)

#: Flags beyond the ones the brief names: root in a container needs
#: --no-sandbox; a small /dev/shm (Docker's 64 MB) crashes renderers without
#: --disable-dev-shm-usage; the rest keep Chromium from fetching updates,
#: variations or sync data in the background and make screenshots repeatable.
CHROMIUM_FLAGS = (
    "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
    "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)

#: Run as `python -c _TRAMPOLINE IN OUT chromium ARGS...`: IN becomes fd 3, OUT
#: fd 4 (both are above 9, so neither dup2 overwrites the other), then exec.
_TRAMPOLINE = ("import os, sys; i, o = int(sys.argv[1]), int(sys.argv[2]); "
               "os.dup2(i, 3); os.dup2(o, 4); os.close(i); os.close(o); "
               "os.execv(sys.argv[3], sys.argv[3:])")

#: How much of Chromium's stderr an error message quotes.
STDERR_TAIL_LINES = 20

#: Bytes per os.read; a full-page screenshot answer is several MB of base64.
READ_SIZE = 1 << 20

#: Schemes whose loads never leave the page (not counted in page.requests).
LOCAL_SCHEMES = ("data:", "blob:", "about:")


class BrowserError(Exception):
    """Chromium could not be started, died, timed out, or refused a command."""


def chromium_path():
    """The path of a Chromium (or Chrome) binary, or None if there is none."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    for path in CHROMIUM_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


# ---------------------------------------------------------------------------
# The browser process and its pipe
# ---------------------------------------------------------------------------

class Browser:
    """A headless Chromium in its own temporary profile; use it as a context manager.

    ``path`` defaults to chromium_path(); ``width`` x ``height`` is each page's
    viewport (device scale 1); ``timeout`` (seconds) bounds every wait.
    """

    def __init__(self, path=None, width=1280, height=900, timeout=60):
        self.path = path or chromium_path()
        if self.path is None:
            raise BrowserError("no Chromium found (looked for %s on PATH and %s); install one, "
                               "e.g. `apt-get install chromium`, or pass path="
                               % (", ".join(CHROMIUM_NAMES), ", ".join(CHROMIUM_PATHS)))
        self.width = width
        self.height = height
        self.timeout = timeout
        self.version = None
        self._process = None
        self._profile = None
        self._to_chromium = None
        self._from_chromium = None
        self._buffer = bytearray()
        self._scanned = 0
        self._next_id = 0
        self._answers = {}
        self._pages = {}
        self._hung = False

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- starting and stopping ----------------------------------------------

    def _start(self):
        """Start Chromium on the two pipes and wait until it answers."""
        self._profile = tempfile.mkdtemp(prefix="threadward-chromium-")
        commands_read, commands_write = os.pipe()
        events_read, events_write = os.pipe()
        # Above 9, so neither of the trampoline's dup2 calls overwrites the other fd.
        child_in = _high_fd(commands_read)
        child_out = _high_fd(events_write)
        for fd in (commands_read, events_write):
            os.close(fd)
        self._to_chromium, self._from_chromium = commands_write, events_read
        os.set_blocking(self._to_chromium, False)   # a hung browser must not block a write
        try:
            self._process = self._spawn(child_in, child_out)
        finally:
            os.close(child_in)
            os.close(child_out)
        self.version = self.call("Browser.getVersion").get("product")

    def _spawn(self, child_in, child_out):
        """Popen of Chromium with child_in as its fd 3 and child_out as its fd 4.

        A one-line Python does the renumbering and then execs Chromium: /bin/sh
        (dash) cannot name fds above 9, and preexec_fn is unsafe with threads."""
        argv = [sys.executable, "-c", _TRAMPOLINE, str(child_in), str(child_out),
                self.path] + list(CHROMIUM_FLAGS) + [
            "--user-data-dir=" + os.path.join(self._profile, "profile"),
            "--window-size=%d,%d" % (self.width, self.height), "about:blank"]
        with open(self._stderr_path(), "wb") as stderr:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr,
                                    stderr=stderr, pass_fds=(child_in, child_out),
                                    start_new_session=True)

    def close(self):
        """Ask Chromium to quit, kill what is left of it, remove the profile; idempotent."""
        if self._process is not None:
            self._quit()
            self._process = None
        for fd in (self._to_chromium, self._from_chromium):
            if fd is not None:
                os.close(fd)
        self._to_chromium = self._from_chromium = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def _quit(self):
        """Browser.close and read the pipe to its end, then SIGKILL what is left of the group.

        Reading on keeps Chromium from blocking on a full pipe while it quits;
        a browser that already timed out gets the SIGKILL at once."""
        if self._process.poll() is None and not self._hung:
            try:
                self._send({"id": self._new_id(), "method": "Browser.close"},
                           time.monotonic() + 5)
                self._read_to_end(time.monotonic() + 10)
            except (BrowserError, OSError):
                pass
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._process.wait()

    def _read_to_end(self, deadline):
        """Discard what Chromium still writes until it closes the pipe (it has quit)."""
        while True:
            self._wait_ready(self._from_chromium, selectors.EVENT_READ, deadline,
                             "the end of the pipe after Browser.close")
            if not os.read(self._from_chromium, READ_SIZE):
                return

    # -- the protocol -------------------------------------------------------

    def call(self, method, params=None, session=None):
        """Send one DevTools command and return its result (a dict)."""
        message_id = self._new_id()
        message = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        deadline = time.monotonic() + self.timeout
        self._send(message, deadline)
        self.pump_until(lambda: message_id in self._answers, method, deadline)
        answer = self._answers.pop(message_id)
        if "error" in answer:
            raise BrowserError("Chromium refused %s: %s" % (method, answer["error"]))
        return answer.get("result", {})

    def pump_until(self, condition, awaited, deadline=None):
        """Read and dispatch messages until condition() is true; True, or BrowserError.

        ``awaited`` names what is waited for in the error message."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while not condition():
            self._dispatch(self._read_message(deadline, awaited))
        return True

    def _new_id(self):
        self._next_id += 1
        return self._next_id

    def _send(self, message, deadline):
        data = json.dumps(message).encode() + b"\0"
        while data:
            self._wait_ready(self._to_chromium, selectors.EVENT_WRITE, deadline,
                             "room on the pipe to send " + message["method"])
            try:
                written = os.write(self._to_chromium, data)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise self._died("sending " + message["method"]) from None
            data = data[written:]

    def _read_message(self, deadline, awaited):
        """The next whole message (a dict) from Chromium."""
        while True:
            end = self._buffer.find(b"\0", self._scanned)
            if end >= 0:
                raw = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                self._scanned = 0
                return json.loads(raw.decode())
            self._scanned = len(self._buffer)
            self._wait_ready(self._from_chromium, selectors.EVENT_READ, deadline, awaited)
            chunk = os.read(self._from_chromium, READ_SIZE)
            if not chunk:
                raise self._died("waiting for " + awaited)
            self._buffer.extend(chunk)

    def _wait_ready(self, fd, events, deadline, awaited):
        """Block until fd is ready, or raise BrowserError at the deadline."""
        with _Selector() as selector:
            selector.register(fd, events)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timed_out(awaited)
                if selector.select(left):
                    return

    def _dispatch(self, message):
        if "id" in message:
            self._answers[message["id"]] = message
            return
        page = self._pages.get(message.get("sessionId"))
        if page is not None:
            page._on_event(message["method"], message.get("params", {}))

    # -- errors -------------------------------------------------------------

    def _stderr_path(self):
        return os.path.join(self._profile, "stderr.log")

    def stderr_tail(self):
        """The last lines Chromium wrote to stderr (a string, maybe empty)."""
        try:
            with open(self._stderr_path(), "rb") as stream:
                lines = stream.read().decode(errors="replace").splitlines()
        except (OSError, TypeError):
            return ""
        return "\n".join(lines[-STDERR_TAIL_LINES:])

    def _died(self, doing):
        code = None
        if self._process is not None:
            try:
                code = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return BrowserError("Chromium (%s) closed its DevTools pipe while %s (exit status %s); "
                            "its stderr ends:\n%s\nFix: run `%s --headless=new --no-sandbox "
                            "--dump-dom about:blank` by hand to see why."
                            % (self.path, doing, code, self.stderr_tail() or "(empty)", self.path))

    def _timed_out(self, awaited):
        self._hung = True
        return BrowserError("Chromium (%s) did not deliver %s within %g s; its stderr ends:\n%s\n"
                            "Fix: raise Browser(timeout=...) on a slow machine, or look for a "
                            "hung page or browser." % (self.path, awaited, self.timeout,
                                                       self.stderr_tail() or "(empty)"))

    # -- pages --------------------------------------------------------------

    def open(self, path):
        """A new tab showing the local file ``path``, returned after its load event."""
        if not os.path.isfile(path):
            raise BrowserError("cannot open %s in Chromium: no such file" % path)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session, pathlib.Path(path).resolve().as_uri())
        self._pages[session] = page
        page._prepare()
        page._navigate()
        return page


def _high_fd(fd):
    """A copy of fd numbered 10 or above (pass_fds makes it inheritable in the child)."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


# poll() when there is one (as subprocess does), select() elsewhere.
if hasattr(selectors, "PollSelector"):
    _Selector = selectors.PollSelector
else:
    _Selector = selectors.SelectSelector


# ---------------------------------------------------------------------------
# One tab
# ---------------------------------------------------------------------------

# Runs in the page: the centre of the first match of a CSS selector (scrolled
# into view) and its tooltip text, an SVG <title> child or a title attribute.
_HOVER_JS = """(function (css) {
  var element = document.querySelector(css);
  if (!element) return null;
  element.scrollIntoView({block: "center", inline: "center"});
  var box = element.getBoundingClientRect();
  var title = null;
  for (var i = 0; i < element.children.length; i++) {
    if (element.children[i].localName === "title") {
      title = element.children[i].textContent;
      break;
    }
  }
  if (title === null && element.hasAttribute("title")) title = element.getAttribute("title");
  return {x: box.left + box.width / 2, y: box.top + box.height / 2, title: title};
})(%s)"""


class Page:
    """One tab of a Browser, made by Browser.open().

    ``errors``: console errors, uncaught exceptions and error log entries, one
    string each.  ``requests``: every URL the page requested besides itself
    (data:, blob: and about: URLs are not requests).  Both grow as the pipe is
    read.
    """

    def __init__(self, browser, target, session, url):
        self.browser = browser
        self.target = target
        self.session = session
        self.url = url
        self.errors = []
        self.requests = []
        self._frame_url = None
        self._loaded = False

    def call(self, method, params=None):
        """A DevTools command in this tab's session."""
        return self.browser.call(method, params, session=self.session)

    def _prepare(self):
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(domain + ".enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.browser.width, "height": self.browser.height,
                   "deviceScaleFactor": 1, "mobile": False})

    def _navigate(self):
        """Page.navigate to self.url and wait for its load event."""
        result = self.call("Page.navigate", {"url": self.url})
        if result.get("errorText"):
            raise BrowserError("Chromium could not load %s: %s" % (self.url, result["errorText"]))
        self.browser.pump_until(lambda: self._loaded and self._frame_url == self.url,
                                "Page.loadEventFired for " + self.url)

    # -- events -------------------------------------------------------------

    def _on_event(self, method, params):
        handler = self._HANDLERS.get(method)
        if handler is not None:
            handler(self, params)

    def _on_frame_navigated(self, params):
        frame = params["frame"]
        if not frame.get("parentId"):
            self._frame_url = frame.get("url", "").split("#")[0]
            self._loaded = False

    def _on_load(self, params):
        self._loaded = True

    def _on_console(self, params):
        if params.get("type") in ("error", "assert"):
            text = " ".join(_describe(arg) for arg in params.get("args", []))
            self.errors.append("console.%s: %s" % (params["type"], text))

    def _on_exception(self, params):
        details = params.get("exceptionDetails", {})
        text = details.get("exception", {}).get("description") or details.get("text", "")
        self.errors.append("exception: %s" % text)

    def _on_log(self, params):
        entry = params.get("entry", {})
        if entry.get("level") == "error":
            where = " (%s)" % entry["url"] if entry.get("url") else ""
            self.errors.append("log: %s%s" % (entry.get("text", ""), where))

    def _on_request(self, params):
        url = params.get("request", {}).get("url", "")
        if url.split("#")[0] != self.url and not url.startswith(LOCAL_SCHEMES):
            self.requests.append(url)

    _HANDLERS = {
        "Page.frameNavigated": _on_frame_navigated,
        "Page.loadEventFired": _on_load,
        "Runtime.consoleAPICalled": _on_console,
        "Runtime.exceptionThrown": _on_exception,
        "Log.entryAdded": _on_log,
        "Network.requestWillBeSent": _on_request,
    }

    # -- what tests call ----------------------------------------------------

    def evaluate(self, js):
        """The value of the JavaScript expression js (awaited if a promise), as JSON data."""
        result = self.call("Runtime.evaluate", {"expression": js, "returnByValue": True,
                                                "awaitPromise": True})
        details = result.get("exceptionDetails")
        if details:
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError("JavaScript failed in %s: %s\nthe code was: %s"
                               % (self.url, text, js))
        return result.get("result", {}).get("value")

    def screenshot(self, path):
        """Write a PNG of the whole page (not just the viewport) to path."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": max(1, size["width"]),
                "height": max(1, size["height"]), "scale": 1}
        result = self.call("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                      "captureBeyondViewport": True})
        with open(path, "wb") as stream:
            stream.write(base64.b64decode(result["data"]))

    def hover(self, css):
        """Move the mouse over the first element matching css; its tooltip text or None."""
        spot = self.evaluate(_HOVER_JS % json.dumps(css))
        if spot is None:
            raise BrowserError("nothing in %s matches the CSS selector %r" % (self.url, css))
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved",
                                               "x": spot["x"], "y": spot["y"]})
        return spot["title"]


def _describe(remote_object):
    """A console argument (a Runtime.RemoteObject) as text."""
    if "value" in remote_object:
        value = remote_object["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return remote_object.get("description") or remote_object.get("type", "")

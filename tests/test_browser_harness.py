"""tests/browser.py against a real headless Chromium: small HTML files under tmp_path.

Skipped as a whole where there is no Chromium (`make test` installs one on a
Debian machine where it runs as root)."""

import os
import struct
import textwrap

import psutil
import pytest

import browser
from browser import Browser, BrowserError

if browser.chromium_path() is None:
    pytest.skip("no Chromium (looked for %s on PATH and %s); install one with "
                "`apt-get install chromium`, or run `make test`, which does on Debian as root"
                % (", ".join(browser.CHROMIUM_NAMES), ", ".join(browser.CHROMIUM_PATHS)),
                allow_module_level=True)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def chromium():
    """One browser for the module; each test opens its own tab."""
    with Browser() as started:
        yield started


def page_of(chromium, tmp_path, body, name="page.html"):
    """Write a small HTML document with ``body`` under tmp_path and open it."""
    path = tmp_path / name
    path.write_text("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>t</title>"
                    "</head><body>\n%s\n</body></html>\n" % textwrap.dedent(body))
    return chromium.open(str(path))


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    with open(path, "rb") as stream:
        head = stream.read(24)
    assert head[:8] == PNG_SIGNATURE, head
    assert head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


# -- loading ------------------------------------------------------------------

def test_a_clean_page_loads_with_no_errors_and_no_requests(chromium, tmp_path):
    page = page_of(chromium, tmp_path, """
        <h1>Report</h1>
        <svg width="100" height="50"><rect width="10" height="10"/><rect x="20" width="10"
        height="10"/></svg>
        <img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">
        <script>document.body.dataset.ran = "yes"; console.log("not an error");</script>
    """)
    assert page.errors == []
    assert page.requests == []
    assert page.evaluate("document.querySelectorAll('svg rect').length") == 2
    assert page.evaluate("document.body.dataset.ran") == "yes"


def test_console_error_is_reported(chromium, tmp_path):
    page = page_of(chromium, tmp_path, '<script>console.error("x", 42)</script>')
    assert page.errors == ["console.error: x 42"]


def test_failed_console_assert_is_reported(chromium, tmp_path):
    page = page_of(chromium, tmp_path, '<script>console.assert(1 === 2, "sums")</script>')
    assert len(page.errors) == 1 and "sums" in page.errors[0], page.errors


def test_uncaught_exception_is_reported(chromium, tmp_path):
    page = page_of(chromium, tmp_path, """
        <script>throw new Error("boom in the page");</script>
        <p>after</p>
    """)
    assert len(page.errors) == 1, page.errors
    assert page.errors[0].startswith("exception: Error: boom in the page"), page.errors


def test_remote_image_is_reported_as_a_request(chromium, tmp_path):
    page = page_of(chromium, tmp_path, '<img src="http://example.invalid/x.png">')
    assert page.requests == ["http://example.invalid/x.png"]
    # It never reaches the network: the harness resolves no host names.
    assert any("ERR_NAME_NOT_RESOLVED" in error for error in page.errors), page.errors


def test_a_local_stylesheet_is_a_request_too(chromium, tmp_path):
    (tmp_path / "style.css").write_text("h1 { color: red }\n")
    page = page_of(chromium, tmp_path, '<link rel="stylesheet" href="style.css"><h1>x</h1>')
    assert page.requests == [(tmp_path / "style.css").resolve().as_uri()]
    assert page.errors == []


def test_opening_a_missing_file_says_so(chromium, tmp_path):
    with pytest.raises(BrowserError, match="no such file"):
        chromium.open(str(tmp_path / "missing.html"))


# -- evaluate -----------------------------------------------------------------

def test_evaluate_returns_json_values(chromium, tmp_path):
    page = page_of(chromium, tmp_path, '<p id="p">hello</p>')
    assert page.evaluate("1 + 2") == 3
    assert page.evaluate("document.getElementById('p').textContent") == "hello"
    value = page.evaluate("({a: [1, 'two', null], b: true})")
    assert value == {"a": [1, "two", None], "b": True}
    assert page.evaluate("undefined") is None
    assert page.evaluate("Promise.resolve(7)") == 7


def test_evaluate_raises_with_the_javascript_error(chromium, tmp_path):
    page = page_of(chromium, tmp_path, "<p>x</p>")
    with pytest.raises(BrowserError, match="Error: nope"):
        page.evaluate("throw new Error('nope')")
    with pytest.raises(BrowserError, match="ReferenceError"):
        page.evaluate("no_such_name + 1")
    assert page.errors == []


# -- screenshot and hover -----------------------------------------------------

def test_screenshot_writes_a_png_of_the_whole_page(chromium, tmp_path):
    page = page_of(chromium, tmp_path, """
        <div style="height: 2500px; background: linear-gradient(red, blue)">tall</div>
    """)
    shot = tmp_path / "shot.png"
    page.screenshot(str(shot))
    width, height = png_size(str(shot))
    assert width == chromium.width
    assert height >= 2500 > chromium.height


def test_hover_returns_the_svg_title_and_moves_the_mouse(chromium, tmp_path):
    page = page_of(chromium, tmp_path, """
        <svg width="400" height="200">
          <rect id="a" x="10" y="10" width="50" height="50"><title>task a: 1.5 s</title></rect>
          <rect id="b" x="100" y="10" width="50" height="50"><title>task b: 2 s</title></rect>
        </svg>
        <span title="plain tooltip">text</span>
        <em>no tooltip</em>
        <script>
          document.getElementById("b").addEventListener("mouseover", function () {
            document.body.dataset.hovered = "b";
          });
        </script>
    """)
    assert page.hover("#b") == "task b: 2 s"
    assert page.evaluate("document.body.dataset.hovered") == "b"
    assert page.hover("rect") == "task a: 1.5 s"
    assert page.hover("span") == "plain tooltip"
    assert page.hover("em") is None
    with pytest.raises(BrowserError, match="matches the CSS selector"):
        page.hover("circle")
    assert page.errors == []


# -- the browser's life -------------------------------------------------------

def test_leaving_the_browser_ends_chromium_and_removes_its_profile():
    with Browser() as started:
        profile = started._profile
        assert started.version and os.path.isdir(profile)
    assert not os.path.exists(profile)
    assert [p.info for p in psutil.process_iter(["pid", "cmdline"])
            if profile in " ".join(p.info["cmdline"] or [])] == []


def fake_chromium(tmp_path, script):
    path = tmp_path / "fake-chromium"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def test_a_chromium_that_dies_is_reported_with_its_stderr(tmp_path):
    path = fake_chromium(tmp_path, "echo 'fake chromium: no display here' >&2\nexit 3\n")
    with pytest.raises(BrowserError) as raised:
        with Browser(path=path):
            pass
    assert "closed its DevTools pipe" in str(raised.value)
    assert "fake chromium: no display here" in str(raised.value)
    assert "exit status 3" in str(raised.value)


def test_a_chromium_that_never_answers_fails_instead_of_hanging(tmp_path):
    path = fake_chromium(tmp_path, "echo 'fake chromium: stuck' >&2\nexec sleep 600\n")
    with pytest.raises(BrowserError) as raised:
        with Browser(path=path, timeout=1):
            pass
    assert "did not deliver Browser.getVersion" in str(raised.value)
    assert "fake chromium: stuck" in str(raised.value)
    assert [p.info for p in psutil.process_iter(["pid", "cmdline"])
            if p.info["cmdline"] == ["sleep", "600"]] == []

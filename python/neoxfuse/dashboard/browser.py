"""Loads a page in headless Chromium and reports what a person would see go wrong.

Chromium (Debian's `chromium` package) is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages ending in a NUL byte, commands on fd 3, replies and
events on fd 4), so nothing listens on a port. The browser gets a fresh profile, no network
(every host name resolves to nothing) and no GPU. `check_page` collects console errors,
uncaught exceptions and failed loads, and counts each plot's data marks in the rendered DOM.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian's package; CI installs it in ci/setup.sh)"

FLAGS = (
    "--headless",
    "--no-sandbox",  # needed as root; the page is our own local file
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--remote-debugging-pipe",
)

# Counted in the page after it loads: the plots it declares and, for each <svg class="plot">,
# its data marks, the marks it declares and its laid-out size.
_INSPECT = """JSON.stringify({
  title: document.title,
  declared_plots: Number(document.body.dataset.plots),
  plots: Array.from(document.querySelectorAll('svg.plot')).map(svg => {
    const box = svg.getBoundingClientRect();
    return {id: svg.id, marks: svg.querySelectorAll('.mark').length,
            declared_marks: Number(svg.dataset.marks), width: box.width, height: box.height};
  })
})"""


class ChromiumNotFoundError(RuntimeError):
    pass


class BrowserError(RuntimeError):
    pass


@dataclass
class PageReport:
    title: str
    declared_plots: int
    plots: list[dict]  # {id, marks, declared_marks, width, height}
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads

    def problems(self) -> list[str]:
        """Everything wrong with the page as seen: errors, missing or empty or invisible plots."""
        found = list(self.errors)
        if len(self.plots) != self.declared_plots:
            found.append(f"the page declares {self.declared_plots} plots; the browser shows {len(self.plots)}")
        for plot in self.plots:
            if plot["marks"] == 0 or plot["marks"] != plot["declared_marks"]:
                found.append(f"plot {plot['id']} shows {plot['marks']} data marks of {plot['declared_marks']}")
            if plot["width"] <= 0 or plot["height"] <= 0:
                found.append(f"plot {plot['id']} has no size on the page")
        return found


def find_chromium() -> str:
    """The Chromium executable; ChromiumNotFoundError (saying how to install it) if there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumNotFoundError(f"no Chromium on PATH: {INSTALL_HINT}")


class _DevTools:
    """Commands and events over Chromium's DevTools pipe."""

    def __init__(self, to_browser: int, from_browser: int, timeout_s: float):
        self._out, self._in = to_browser, from_browser
        self._buffer = b""
        self._next_id = 0
        self._deadline = time.monotonic() + timeout_s
        self.events: list[dict] = []

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            left = self._deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self._out, json.dumps(command).encode() + b"\0")
        while True:
            message = self._receive()
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            message = self._receive()
            self.events.append(message)
            if message.get("method") == method:
                return message


def _errors(events: list[dict]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            found.append("exception: " + str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(
                "console."
                + params["type"]
                + ": "
                + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", []))
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            found.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return found


def check_page(page: Path, *, timeout_s: float = 60, screenshot: Path | None = None) -> PageReport:
    """Loads `page` (a local HTML file) and inspects it; optionally saves a full-page PNG."""
    chromium = find_chromium()
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    # The child's ends, moved above fd 4 so that placing them at 3 and 4 cannot overwrite each other.
    child_read, child_write = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w))
    os.close(to_browser_r)
    os.close(from_browser_w)

    def wire_pipes() -> None:  # in the child: the DevTools pipe is fd 3 (commands) and fd 4 (replies)
        os.dup2(child_read, 3)
        os.dup2(child_write, 4)

    with tempfile.TemporaryDirectory(prefix="neoxfuse-chromium-") as profile:
        log = Path(profile) / "chromium.log"
        with open(log, "wb") as log_file:
            browser = subprocess.Popen(
                [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                pass_fds=(3, 4),
                preexec_fn=wire_pipes,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=os.environ | {"HOME": profile},
            )
        os.close(child_read)
        os.close(child_write)
        tools = _DevTools(to_browser_w, from_browser_r, timeout_s)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                tools.send(f"{domain}.enable", session=session)
            tools.send("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=session)
            tools.wait_for("Page.loadEventFired")
            found = tools.send("Runtime.evaluate", {"expression": _INSPECT, "returnByValue": True}, session=session)
            inspected = json.loads(found["result"]["value"])
            if screenshot is not None:
                size = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                tools.send(
                    "Emulation.setDeviceMetricsOverride",
                    {
                        "width": 1400,
                        "height": min(int(size["height"]) + 1, 16000),
                        "deviceScaleFactor": 1,
                        "mobile": False,
                    },
                    session=session,
                )
                png = tools.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
                Path(screenshot).write_bytes(base64.b64decode(png))
            tools.send("Browser.close")
        except BrowserError as err:
            browser.kill()
            raise BrowserError(f"{err}; Chromium's log ends: {log.read_text(errors='replace')[-2000:]}") from err
        finally:
            os.close(to_browser_w)
            os.close(from_browser_r)
            if browser.poll() is None:
                try:
                    browser.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    browser.kill()
                    browser.wait()
    return PageReport(inspected["title"], inspected["declared_plots"], inspected["plots"], _errors(tools.events))

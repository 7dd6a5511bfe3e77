"""A page as headless Chromium shows it, read over the DevTools protocol (a websocket; no driver): the
console errors and uncaught exceptions while it loads, every request it makes, whether each image
decoded, and its visible text.

    seen = open_page(Path("runs/x/report.html"))
    assert not seen["errors"] and seen["images"]["broken"] == 0
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHECK = """JSON.stringify({
  images: {total: document.images.length,
           broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length},
  text: document.body.innerText,
  links: Array.from(document.links).map(a => a.href)})"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def open_page(path: Path, timeout: float = 60) -> dict:
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="raylm-chromium-")
    proc = subprocess.Popen(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",  # as root in a container
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its renderer and helper processes end with it
        # its own temp folders (its singleton socket) go with the profile
        env={**os.environ, "TMPDIR": profile},
    )
    try:
        port = _devtools_port(proc, timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            target = next(t for t in json.load(answer) if t["type"] == "page")
        ids = itertools.count(1)
        errors: list[str] = []
        requests: list[str] = []
        with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:

            def call(method: str, **params) -> dict:
                number = next(ids)
                ws.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=timeout))
                    if message.get("id") == number:
                        return message.get("result", {})
                    note(message)

            def note(message: dict) -> None:
                method, params = message.get("method"), message.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
                elif method == "Runtime.exceptionThrown":
                    errors.append(params["exceptionDetails"].get("text", "exception"))
                elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                    errors.append(params["entry"]["text"])
                elif method == "Network.requestWillBeSent":
                    requests.append(params["request"]["url"])
                elif method == "Network.loadingFailed":
                    errors.append(f"request failed: {params.get('errorText')}")

            for domain in ("Runtime", "Log", "Network", "Page"):
                call(f"{domain}.enable")
            call("Page.navigate", url=path.resolve().as_uri())
            deadline = time.monotonic() + timeout
            while True:
                message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                note(message)
                if message.get("method") == "Page.loadEventFired":
                    break
            found = json.loads(
                call("Runtime.evaluate", expression=CHECK, returnByValue=True)["result"]["value"]
            )
        return {**found, "errors": errors, "requests": requests}
    finally:
        with contextlib.suppress(ProcessLookupError):  # already ended (and reaped) on its own
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise RuntimeError("chromium did not start its DevTools endpoint:\n" + "".join(seen)[-2000:])

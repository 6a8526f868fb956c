"""Open report.html in a real headless Chromium and list what a reader would see broken.

`python -m oodscale.evaluate.report_check runs/digits/eval/report.html [--screenshot x.png]`
(or `make report-check`) exits non-zero on any console error, uncaught exception, failed load,
image that did not decode, or table whose header click does not sort it.

The browser is driven over the Chrome DevTools Protocol (aiohttp's websocket client, which Ray
already installs), so console messages and image state are read as structured events rather than
scraped from logs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "install Debian's chromium (`apt-get install chromium`; `make test` does it as root)"

# Runs in the page after load: images that did not decode, and whether clicking each table's
# second-to-last header sorts that column (numbers as numbers, "-" last).
PAGE_CHECKS = """(() => {
  const broken = Array.from(document.images)
    .filter(i => !i.complete || i.naturalWidth === 0)
    .map(i => i.alt || i.src.slice(0, 40));
  const unsorted = [];
  document.querySelectorAll("table.sortable").forEach((table, t) => {
    const heads = table.tHead.rows[0].cells;
    const col = Math.max(0, heads.length - 2);
    heads[col].click();
    const keys = Array.from(table.tBodies[0].rows, r => parseFloat(r.cells[col].textContent))
      .filter(v => !Number.isNaN(v));
    if (keys.some((v, i) => i > 0 && keys[i - 1] > v)) unsorted.push(t);
  });
  return {images: document.images.length, broken, unsorted,
          tables: document.querySelectorAll("table.sortable").length};
})()"""


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"no headless browser found ({', '.join(BROWSERS)}): {INSTALL_HINT}")


class _CDP:
    """Just enough of the DevTools Protocol: numbered commands, events collected as they come."""

    def __init__(self, ws: Any):
        self.ws, self.ids, self.events = ws, itertools.count(1), []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def wait_for(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the page sent no {method} within {timeout:.0f} s")
            self.events.append(await asyncio.wait_for(self.ws.receive_json(), left))


def _problems(events: list[dict[str, Any]]) -> list[str]:
    found = []
    for e in events:
        params = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            found.append(f"console.{params['type']}: {text}")
        elif e.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append("uncaught exception: " + details.get("exception", {}).get(
                "description", details.get("text", "")))
        elif e.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"browser log error: {params['entry']['text']}")
    return found


async def _inspect(port: int, url: str, screenshot: Path | None, timeout: float) -> list[str]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        page = await _first_page(session, port, timeout)
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _CDP(ws)
            for domain in ("Runtime", "Log", "Page"):
                await cdp.send(f"{domain}.enable")
            await cdp.send("Emulation.setDeviceMetricsOverride", width=1280, height=1600,
                           deviceScaleFactor=1, mobile=False)
            await cdp.send("Page.navigate", url=url)
            await cdp.wait_for("Page.loadEventFired", timeout)
            if screenshot is not None:  # before the sort checks reorder the tables
                shot = await cdp.send("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            result = await cdp.send("Runtime.evaluate", expression=PAGE_CHECKS,
                                    returnByValue=True)
            state = result["result"]["value"]
            problems = _problems(cdp.events)
    problems += [f"image did not load or decode: {alt}" for alt in state["broken"]]
    problems += [f"table {t} does not sort by its header" for t in state["unsorted"]]
    if not state["images"] or not state["tables"]:
        problems.append(f"the page shows {state['images']} images and {state['tables']} "
                        "sortable tables; a report has both")
    return problems


async def _first_page(session: Any, port: int, timeout: float) -> dict[str, Any]:
    """The browser's first tab, once DevTools lists it (it may lag the port by a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            pages = [t for t in await resp.json() if t["type"] == "page"]
        if pages:
            return pages[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"the browser opened no tab within {timeout:.0f} s")
        await asyncio.sleep(0.1)


def check_report(path: str | Path, screenshot: str | Path | None = None,
                 timeout: float = 60.0) -> list[str]:
    """Problems a real browser finds in the HTML file at `path` (empty: none)."""
    page = Path(path).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"{page} does not exist; `oodscale report CONFIG` writes it")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            # --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers' small /dev/shm
            [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage",
             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = _devtools_port(Path(profile) / "DevToolsActivePort", proc, timeout)
            return asyncio.run(_inspect(port, page.as_uri(),
                                        Path(screenshot) if screenshot else None, timeout))
        finally:
            _close_browser(proc, profile)


def _close_browser(proc: subprocess.Popen, profile: str) -> None:
    """Stop the browser and every helper it started (renderers, the crash handler, which
    detaches from it), so none still writes into the profile while it is removed."""
    import psutil

    from oodscale.processes import stop_processes

    helpers = {p.pid: p for p in psutil.process_iter(["cmdline"])
               if any(profile in arg for arg in p.info["cmdline"] or ())}
    if proc.poll() is None:  # else it exited early and is reaped already
        browser = psutil.Process(proc.pid)
        helpers.update((p.pid, p) for p in [browser, *browser.children(recursive=True)])
    stop_processes(list(helpers.values()))
    proc.wait(timeout=30)


def _devtools_port(marker: Path, proc: subprocess.Popen, timeout: float) -> int:
    """The port Chromium picked, from the file it writes once DevTools listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the browser exited with code {proc.returncode} before "
                               "DevTools started")
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text().splitlines()[0])
        time.sleep(0.1)
    raise TimeoutError(f"the browser opened no DevTools port within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="path of report.html")
    parser.add_argument("--screenshot", help="also save the first 1280x1600 pixels as PNG")
    args = parser.parse_args(argv)
    problems = check_report(args.report, args.screenshot)
    for problem in problems:
        print(f"FAIL {problem}")
    print(json.dumps({"report": args.report, "problems": len(problems)}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""A real headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for the report tests.

`open_page(path)` loads a local file and returns what the page logged, whether its images decode, the figures
it shows (elements with data-key) and a PNG screenshot. aiohttp (a dependency already) speaks the websocket.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHECK = """(async () => {
  const imgs = [...document.images];
  const svg = [...document.querySelectorAll('svg image')].map(e => e.getAttribute('href'));
  let svgBroken = 0;
  for (const href of svg) { const im = new Image(); im.src = href; try { await im.decode(); } catch (e) { svgBroken++; } }
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const figures = Object.fromEntries([...document.querySelectorAll('[data-key]')].map(e => [e.dataset.key, e.textContent]));
  const external = [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
    .filter(u => !u.startsWith('data:'));
  return JSON.stringify({imgs: imgs.length, broken, svgImages: svg.length, svgBroken, figures, external,
                         title: document.title, svgs: document.querySelectorAll('svg').length});
})()"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


async def _session(port: int, path: Path, width: int, height: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/version") as r:
            ws_url = (await r.json())["webSocketDebuggerUrl"]
        async with http.ws_connect(ws_url, max_msg_size=0) as ws:
            ids, events = iter(range(1, 10**6)), []

            async def call(method: str, session: str | None = None, **params):
                mid = next(ids)
                await ws.send_json({"id": mid, "method": method, "params": params} | ({"sessionId": session} if session else {}))
                while True:
                    msg = json.loads((await ws.receive(timeout=60)).data)
                    if msg.get("id") == mid:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg["result"]
                    events.append(msg)

            target = (await call("Target.createTarget", url="about:blank"))["targetId"]
            sid = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                await call(f"{domain}.enable", sid)
            await call("Emulation.setDeviceMetricsOverride", sid, width=width, height=height, deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", sid, url=path.resolve().as_uri())
            while not any(e.get("method") == "Page.loadEventFired" for e in events):
                events.append(json.loads((await ws.receive(timeout=60)).data))
            result = await call("Runtime.evaluate", sid, expression=CHECK, awaitPromise=True, returnByValue=True)
            shot = await call("Page.captureScreenshot", sid, format="png")
    errors = [e for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    return json.loads(result["result"]["value"]) | {"errors": errors, "png": base64.b64decode(shot["data"])}


def open_page(path: Path, width: int = 1100, height: int = 1600) -> dict:
    """Load path in headless Chromium: {imgs, broken, svgImages, svgBroken, figures, external, errors, png, ...}."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
                time.sleep(0.1)  # polling a condition (the port file), not waiting on a timing
            port = int(port_file.read_text().split()[0])
            return asyncio.run(_session(port, path, width, height))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait()

"""Check the built documentation site in a real browser: headless Chromium, localhost only.

    python tools/docs_check.py site [--screenshots DIR]

Serves ``site/`` on a free localhost port and drives Debian's ``chromium`` (headless, no
network beyond localhost) over the DevTools protocol: the home page, the API page of
``fmjax.exact.velocity`` and the rendered quick-start notebook must load without console errors
or failed requests; the math of the home and engine pages must be MathML that the browser lays
out (no script from a CDN); and the site's search must find ``velocity_field``. A screenshot of
each page is written for a person to look at. Exit status 1 with one line per failed check.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1280,900",
]
# (name, path, a JavaScript expression that must be true once the page has loaded)
PAGES = [
    ("home", "index.html", "document.querySelectorAll('math').length > 0"),
    ("engine", "concepts/engine/index.html", "document.querySelectorAll('math').length > 10"),
    ("exact_velocity", "api/exact/index.html", "!!document.getElementById('fmjax.exact.velocity')"),
    (
        "notebook",
        "notebooks/00_quickstart/index.html",
        "document.body.innerText.includes('exact.velocity(coupling, s, 0.5, x)')",
    ),
]
# Math laid out by the browser: a <math> element with a real box (not raw TeX text).
MATH_RENDERS = (
    "Array.from(document.querySelectorAll('math')).every("
    "m => m.getBoundingClientRect().width > 0) && !document.body.innerText.includes('\\\\(')"
)
SEARCH_RESULTS = (
    "Array.from(document.querySelectorAll('.md-search-result__item'))"
    ".map(e => e.innerText).join('\\n')"
)


class _DevTools:
    """A minimal DevTools-protocol client over a WebSocket (stdlib only)."""

    def __init__(self, ws_url: str):
        host, port, path = re.match(r"ws://([^:/]+):(\d+)(/.*)", ws_url).groups()
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += self.sock.recv(1)
        if b" 101 " not in reply.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"docs_check: WebSocket handshake failed: {reply[:80]!r}")
        self.next_id, self.events = 0, []

    def _send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        head = b"\x81" + (
            bytes([0x80 | n])
            if n < 126
            else bytes([0x80 | 126]) + struct.pack(">H", n)
            if n < 65536
            else bytes([0x80 | 127]) + struct.pack(">Q", n)
        )
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("docs_check: the browser closed the connection")
            buf += chunk
        return buf

    def _recv(self) -> dict:
        message = b""
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            message += self._exact(n)
            if b0 & 0x80:  # FIN
                return json.loads(message)

    def call(self, method: str, **params):
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = self._recv()
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"docs_check: {method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        """Poll ``expression`` until it is truthy; its last value."""
        end, value = time.monotonic() + timeout, None
        while time.monotonic() < end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        return value

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed requests seen so far (then cleared)."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif method == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry']['text']} {p['entry'].get('url', '')}".strip())
            elif method == "Network.loadingFailed" and not p.get("canceled"):
                out.append(f"request failed: {p.get('errorText')}")
        self.events.clear()
        return out


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("docs_check: Chromium not found (apt install chromium)")


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def _start_browser(profile: str) -> tuple[subprocess.Popen, _DevTools]:
    cmd = [_browser(), *CHROMIUM_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if m := re.search(r"DevTools listening on (ws://\S+)", line):
            port = re.match(r"ws://[^:]+:(\d+)/", m.group(1)).group(1)
            break
    else:
        sys.exit("docs_check: Chromium did not start")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
        page = next(t for t in json.load(r) if t["type"] == "page")
    devtools = _DevTools(page["webSocketDebuggerUrl"])
    for domain in ("Page", "Runtime", "Log", "Network"):
        devtools.call(f"{domain}.enable")
    return proc, devtools


def _load(devtools: _DevTools, url: str) -> None:
    devtools.call("Page.navigate", url=url)
    devtools.wait_for("document.readyState === 'complete'")
    time.sleep(1.0)  # late requests (fonts, images, the search index)


def _shot(devtools: _DevTools, path: Path) -> None:
    data = devtools.call("Page.captureScreenshot", format="png")["data"]
    path.write_bytes(base64.b64decode(data))


def check(site: Path, shots: Path) -> list[str]:
    shots.mkdir(parents=True, exist_ok=True)
    server, base = _serve(site)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as profile:
        proc, devtools = _start_browser(profile)
        try:
            for name, path, ready in PAGES:
                _load(devtools, base + path)
                if not devtools.wait_for(ready, timeout=15):
                    problems.append(f"{name}: {path} lacks what it must show ({ready})")
                if name in ("home", "engine") and not devtools.evaluate(MATH_RENDERS):
                    problems.append(f"{name}: the math is not laid out as MathML")
                problems += [f"{name}: console: {e}" for e in devtools.errors()]
                _shot(devtools, shots / f"{name}.png")
                print(f"{name}: {base + path} -> {shots / (name + '.png')}")
            _load(devtools, base + "index.html?q=velocity_field")
            found = devtools.wait_for(SEARCH_RESULTS, timeout=30) or ""
            if "velocity_field" not in found:
                problems.append(f"search: velocity_field not found (results: {found[:200]!r})")
            problems += [f"search: console: {e}" for e in devtools.errors()]
            _shot(devtools, shots / "search.png")
            print(f"search: {len(found.splitlines())} lines of results -> {shots / 'search.png'}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            server.shutdown()
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("site", type=Path, help="the built site (make docs)")
    p.add_argument("--screenshots", type=Path, default=Path("outputs/docs_check"))
    args = p.parse_args(argv)
    if not (args.site / "index.html").is_file():
        sys.exit(f"docs_check: {args.site}/index.html not found (run make docs)")
    problems = check(args.site, args.screenshots)
    for line in problems:
        print(line)
    print("docs_check: ok" if not problems else f"docs_check: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

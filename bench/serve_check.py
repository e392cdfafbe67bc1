"""Start `hearth serve` on a model, wait until ready, send one chat request, stop it with SIGTERM.

    python bench/serve_check.py --label "70B bf16" --log serve.log --json results.jsonl -- \\
        --model /tmp/shapes/llama-3.3-70b --load-format dummy --gpu-memory-utilization 0.97

Everything after `--` goes to `hearth serve`. Prints (and appends as JSON lines): seconds until
ready, the KV capacity from the ready line, the chat reply's usage and text, the exit code.
Standard library only: it runs wherever hearth's server does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except Exception:  # not listening yet, or 503 while loading
            time.sleep(0.5)
    return False


def chat(url: str, timeout: float) -> dict:
    body = {
        "model": "any",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with urllib.request.urlopen(f"{url}/v1/models", timeout=timeout) as reply:
        body["model"] = json.loads(reply.read())["data"][0]["id"]
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


def rss_mib(pid: int) -> int | str:
    """The process's resident set (VmRSS) in MiB, where Linux says."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) >> 10
    except (OSError, ValueError):
        pass
    return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="serve")
    parser.add_argument("--log", type=Path, required=True, help="the server's output (appended)")
    parser.add_argument("--json", default=None, help="append JSON lines here")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict[str, object] = {}
    started = time.monotonic()
    with args.log.open("a", encoding="utf-8") as log:
        log.write(f"==== {args.label}: hearth serve {' '.join(serve_args)}\n")
        log.flush()
        command = [sys.executable, "-P", "-m", "hearth", "serve", "--port", str(port), *serve_args]
        server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            if wait_ready(url, server, started + args.ready_timeout):
                results["ready s"] = round(time.monotonic() - started, 1)
                reply = chat(url, timeout=120)
                results["chat completion tokens"] = reply["usage"]["completion_tokens"]
                results["chat reply"] = repr(reply["choices"][0]["message"]["content"][:40])
                time.sleep(2)  # idle
                results["RSS at idle MiB"] = rss_mib(server.pid)
            else:
                results["ready s"] = "not ready"
        except Exception as exc:  # reported in the table
            results["chat error"] = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            try:
                results["exit code"] = server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                results["exit code"] = "killed"
    text = args.log.read_text(encoding="utf-8", errors="replace")
    section = text[text.rfind(f"==== {args.label}:") :]
    ready = re.search(r"ready: .* KV capacity (\d+) tokens", section)
    results["KV capacity tokens (ready line)"] = int(ready.group(1)) if ready else "no ready line"
    built = re.search(r"dummy weights: .*?([\d.]+) GiB on \S+ in ([\d.]+) s", section)
    if built:
        results["dummy weights GiB / build s"] = f"{built.group(1)} / {built.group(2)}"
    for line in section.splitlines():
        if any(key in line for key in (" ERROR ", "Traceback", "KV cache", "autotune:")):
            print(f"  log: {line}")
    for measure, value in results.items():
        print(f"{args.label}: serve {measure}: {value}", flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as out:
                row = dict(section=args.label, measure=f"serve: {measure}", value=value)
                out.write(json.dumps(row) + "\n")
    answered = isinstance(results.get("chat completion tokens"), int)
    return 0 if answered and results.get("exit code") == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

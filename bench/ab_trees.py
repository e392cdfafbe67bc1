"""Two checkouts of hearth, one run: is a change (a refactor, a move) any slower?

Alternates the two trees round by round on the same machine, each through its own Python (a
checkout's `.venv`), and prints every round and the median ratio after / before:

- engine: bench/engine_bench.py of each tree, hearth only (SmolLM2-135M on CPU, 32 x 64 @ 32),
  its "partial: hearth … tok/s" line;
- http: each tree's `hearth serve` at its defaults, driven by bench/http_bench.py's client
  (32 chat requests x 64 tokens at concurrency 32, greedy).

    python bench/ab_trees.py --before /path/to/old/checkout --rounds 3 engine http
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*; hearth comes installed

from bench.http_bench import (  # noqa: E402
    DEFAULT_SOURCE,
    MODEL_ID,
    free_port,
    serve_and_load,
    variant_config,
)
from bench.machine import describe  # noqa: E402

PARTIAL = re.compile(r"partial: hearth ([\d.]+) tok/s")


def python_of(tree: Path) -> Path:
    """The checkout's own interpreter (its .venv), where its hearth is installed editable."""
    python = tree / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{tree}: no .venv/bin/python (make install there first)")
    return python


def engine_round(tree: Path) -> float:
    """One engine_bench run of the tree, hearth only: output tok/s."""
    out = subprocess.run(
        [str(python_of(tree)), "bench/engine_bench.py", "--skip", "cb,sequential,ceiling"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    found = PARTIAL.findall(out.stdout)
    if not found:
        raise RuntimeError(f"{tree}: engine_bench printed no result\n{out.stderr[-2000:]}")
    return float(found[-1])


def http_round(tree: Path, args: argparse.Namespace) -> float:
    """The tree's `hearth serve` at its defaults under http_bench's load: output tok/s."""
    port = free_port()
    hearth = python_of(tree).parent / "hearth"
    command = [str(hearth), "serve", "--port", str(port), "--config"]
    command.append(variant_config(DEFAULT_SOURCE, None))
    return serve_and_load(str(tree), command, {}, "/health", MODEL_ID, port, args).tok_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--after", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("benches", nargs="+", choices=["engine", "http"])
    args = parser.parse_args()
    print(describe(), flush=True)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True
        ).stdout.strip()
        print(f"{name}: {tree} at {commit}")
    print(f"{'bench':<8}{'round':<7}{'before tok/s':>14}{'after tok/s':>13}{'after/before':>14}")
    for bench in args.benches:
        ratios = []
        for round_no in range(1, args.rounds + 1):
            order = list(trees) if round_no % 2 else list(reversed(trees))  # alternate who's first
            tok_s = {}
            for name in order:
                tree = trees[name]
                tok_s[name] = engine_round(tree) if bench == "engine" else http_round(tree, args)
            ratios.append(tok_s["after"] / tok_s["before"])
            print(
                f"{bench:<8}{round_no:<7}{tok_s['before']:>14.1f}{tok_s['after']:>13.1f}"
                f"{ratios[-1]:>14.2f}",
                flush=True,
            )
        print(f"{bench}: median after/before {statistics.median(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()

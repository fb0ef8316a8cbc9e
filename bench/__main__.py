"""``python -m bench`` (``make bench``): run every benchmark, print each figure beside its
reference, and rewrite ``docs/benchmarks.md`` with the latest figures.

``--quick`` runs each one with a small N as a smoke test (results kept apart, docs untouched);
``--only NAME`` runs one of them.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import agent, connections, delta, download, downtime, ingest, registry, relay, rollout
from bench.common import BENCH_ORDER, ROOT, finish, print_result, write_docs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N everywhere: a smoke run, docs untouched")
    ap.add_argument("--only", choices=BENCH_ORDER, action="append", help="run just this benchmark (repeatable)")
    ap.add_argument("--devices", type=int, help="connections: agents (default 10,000)")
    ap.add_argument("--registry-devices", type=int, help="registry: devices (default 100,000)")
    ap.add_argument("--rollout-devices", type=int, help="rollout: devices of the rollout (default 10,000)")
    a = ap.parse_args(argv)
    chosen = a.only or list(BENCH_ORDER)
    t0 = time.perf_counter()
    results = []
    failed: list[str] = []
    for name in chosen:
        print(f"\n### bench {name}{' (quick)' if a.quick else ''}", flush=True)
        args = ["--no-docs"] + (["--quick"] if a.quick else [])
        try:
            if name == "connections":
                if a.devices:
                    args += ["--devices", str(a.devices)]
                result = connections.main_result(args)
            elif name == "registry":
                if a.registry_devices:
                    args += ["--devices", str(a.registry_devices)]
                result = registry.main_result(args)
            elif name == "ingest":
                result = ingest.main_result(args)
            elif name == "download":
                result = download.main_result(args)
            elif name == "downtime":
                result = downtime.main_result(args)
            elif name == "delta":
                result = delta.main_result(args)
            elif name == "rollout":
                if a.rollout_devices:
                    args += ["--devices", str(a.rollout_devices)]
                result = rollout.main_result(args)
            elif name == "relay":
                result = relay.main_result(args)
            else:
                result = agent.main_result(args)
        except Exception as exc:  # one failing benchmark must not hide the others' figures
            print(f"bench {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        finish(result, docs=False)
        results.append(result)
    print(f"\n### all figures ({time.perf_counter() - t0:.0f} s)")
    for r in results:
        print_result(r)
    if not a.quick and results:
        print(f"\ndocs: {write_docs().relative_to(ROOT)}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

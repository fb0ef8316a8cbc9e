"""Registry benchmark: selector pages and dynamic-group evaluation over 100,000 devices.

What it does:

1. ``corral server init`` a fresh data dir, then write N devices straight into its SQLite
   database (the schema of ``corral/server/store/models.py``): ~95 % accepted, 3 tags each
   (``site`` among 20 cities, ``hw_rev`` A-D, ``env`` prod/staging), an inventory like the
   agent reports (model, os, os_version, ...), a static group of 1,000 members; 60 % online.
2. Start the real server on that database and time, over HTTP with httpx:

   * ``GET /api/v1/devices?selector=...&limit=50`` — one page of ``corral device list
     --selector``, for several selectors (indexed tag, JSON attribute, mixed, sparse), walking
     the pages with ``next_cursor`` so deep pages are sampled too;
   * ``GET /api/v1/groups/NAME`` — the full evaluation of a dynamic group (its size, the
     selector pushed down to SQL as a ``COUNT``);
   * paging through all members, ``GET /api/v1/groups/NAME/devices?limit=1000`` to the end.

3. Reference: the very same SQL statements (compiled from the same SQLAlchemy code, with the
   same parameters and cursors), run with the standard library's ``sqlite3`` on the same
   database file in the same run. The ratio is what the REST layer (HTTP, auth, ORM,
   serialisation) adds on top of the database.

Run alone: ``python -m bench.registry [--devices 100000] [--quick]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CorralServer,
    Figure,
    add_figures,
    finish,
    new_result,
    summarize_ms,
)

SITES = ("berlin", "lisbon", "osaka", "austin", "lagos", "lima", "oslo", "pune", "perth", "quito",
         "seoul", "tunis", "turin", "porto", "dakar", "hanoi", "cairo", "kyiv", "denver", "cork")
HW_REVS = (("A", 0.4), ("B", 0.3), ("C", 0.2), ("D", 0.1))
MODELS = {  # model: (weight, os, os versions, kernel, arch)
    "rpi4": (0.35, "Raspberry Pi OS", ("11", "12"), "6.6.31-v8+", "aarch64"),
    "rpi3": (0.10, "Raspberry Pi OS", ("11",), "6.1.21-v7+", "armv7l"),
    "imx8mm": (0.30, "Poky (Yocto Project)", ("4.0.12", "4.0.15"), "5.15.71-imx", "aarch64"),
    "jetson-nano": (0.05, "Ubuntu", ("20.04", "22.04"), "4.9.337-tegra", "aarch64"),
    "x86-gateway": (0.20, "Debian GNU/Linux", ("11", "12"), "6.1.0-21-amd64", "x86_64"),
}
STATUSES = (("accepted", 0.95), ("pending", 0.03), ("rejected", 0.01), ("decommissioned", 0.01))
STATIC_GROUP = "canary"
STATIC_MEMBERS = 1000

#: device-list selectors: (label, selector). Their match rates at 100k are in the result.
LIST_SELECTORS = (
    ("tag", 'tag.site == "berlin"'),
    ("attr", 'attr.model == "rpi4"'),
    ("mixed (DESIGN §7 example)", 'tag.site == "berlin" and attr.os_version < "12" and online'),
    ("sparse", 'tag.site == "oslo" and attr.model == "jetson-nano" and tag.hw_rev == "D"'),
)
#: dynamic groups: (name, selector)
GROUPS = (
    ("site-berlin", 'tag.site == "berlin"'),
    ("prod-old-os", 'tag.env == "prod" and attr.os_version in ["11", "20.04", "4.0.12"]'),
)

PAGE_GOAL_MS = 100.0
EVAL_GOAL_MS = 1000.0


# --- populating the database ------------------------------------------------------------------


def _pick(rng: random.Random, weighted: Any) -> Any:
    items = list(weighted.items()) if isinstance(weighted, dict) else list(weighted)
    x = rng.random()
    acc = 0.0
    for item in items:
        w = item[1][0] if isinstance(weighted, dict) else item[1]
        acc += w
        if x < acc:
            return item
    return items[-1]


def populate(db_path: Path, n: int, seed: int = 1) -> dict[str, Any]:
    """Write ``n`` devices with tags and inventories; returns counts for the report."""
    rng = random.Random(seed)
    now = time.time()
    devices: list[tuple[Any, ...]] = []
    tags: list[tuple[str, str, str]] = []
    ids: list[str] = []
    accepted: list[str] = []
    for i in range(n):
        pk = rng.randbytes(32)
        dev_id = hashlib.sha256(pk).hexdigest()[:32]  # protocol.device_id_for
        model, (_, os_name, versions, kernel, arch) = _pick(rng, MODELS)
        status = _pick(rng, STATUSES)[0]
        created = now - rng.uniform(0, 365 * 86400)
        inv = {"os": os_name, "os_version": rng.choice(versions), "kernel": kernel, "arch": arch,
               "hostname": f"dev-{i:06d}", "agent_version": "0.1.0", "model": model,
               "software": {"demo": rng.choice(("1.1.0", "1.2.0"))},
               "memory_total_bytes": rng.choice((1, 2, 4, 8)) << 30,
               "disk_total_bytes": rng.choice((8, 16, 32, 64)) << 30}
        admitted = created + 60 if status == "accepted" else None
        devices.append((dev_id, pk, status, created, created, admitted, 0, now - rng.uniform(0, 86400), None,
                        json.dumps(inv), created + 60, None))
        tags.append((dev_id, "site", rng.choice(SITES)))
        tags.append((dev_id, "hw_rev", _pick(rng, HW_REVS)[0]))
        tags.append((dev_id, "env", "prod" if rng.random() < 0.9 else "staging"))
        ids.append(dev_id)
        if status == "accepted":
            accepted.append(dev_id)
    con = sqlite3.connect(db_path)
    try:
        with con:
            con.executemany("INSERT INTO devices (id, public_key, status, created_at, updated_at, admitted_at, "
                            "online, last_seen, replica, inventory, inventory_at, enrollment_token_id) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", devices)
            con.executemany("INSERT INTO device_tags (device_id, key, value) VALUES (?,?,?)", tags)
            con.execute("INSERT INTO groups (name, selector, description, created_at) VALUES (?,?,?,?)",
                        (STATIC_GROUP, None, "static group for the benchmark", now))
            con.executemany("INSERT INTO group_members (group_name, device_id) VALUES (?,?)",
                            [(STATIC_GROUP, d) for d in rng.sample(ids, min(STATIC_MEMBERS, n))])
    finally:
        con.close()
    return {"devices": n, "tags": len(tags), "accepted": len(accepted)}


def mark_online(db_path: Path, fraction: float, seed: int = 2) -> int:
    """Mark a share of the accepted devices online (after the server started: at start it marks
    every device offline, as no session survives a restart)."""
    con = sqlite3.connect(db_path, timeout=30)
    try:
        ids = [r[0] for r in con.execute("SELECT id FROM devices WHERE status = 'accepted'")]
        chosen = random.Random(seed).sample(ids, int(len(ids) * fraction))
        now = time.time()
        with con:
            con.executemany("UPDATE devices SET online = 1, last_seen = ? WHERE id = ?", [(now, d) for d in chosen])
        return len(chosen)
    finally:
        con.close()


# --- the reference: the server's own SQL, run with sqlite3 -------------------------------------


class _Paging:
    """Stands in for the API's ``PageParams`` when building the same statement here."""

    def __init__(self, limit: int, cursor: list[Any] | None) -> None:
        self.limit = limit
        self.cursor = cursor


@dataclass
class RawQueries:
    """Compiles the statements the REST handlers run and times them with plain sqlite3."""

    db_path: Path

    def __post_init__(self) -> None:
        from sqlalchemy.dialects import sqlite as sqlite_dialect

        self.dialect = sqlite_dialect.dialect()
        self.con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)

    def close(self) -> None:
        self.con.close()

    def _run(self, stmt: Any) -> tuple[list[Any], float]:
        """Execute and fetch; returns the rows and the time of just that (not the compiling)."""
        compiled = stmt.compile(dialect=self.dialect, compile_kwargs={"render_postcompile": True})
        params = compiled.construct_params()
        sql, args = str(compiled), [params[k] for k in (compiled.positiontup or [])]
        t0 = time.perf_counter()
        rows = self.con.execute(sql, args).fetchall()
        return rows, time.perf_counter() - t0

    def page_statement(self, selector: str | None, group_selector: str | None, limit: int,
                       cursor: str | None, sort: str = "id") -> Any:
        from sqlalchemy import select

        from corral.server.api.deps import decode_cursor
        from corral.server.api.devices import keyset, selector_clause
        from corral.server.store.models import Device

        stmt = select(Device)
        clause = selector_clause(selector or group_selector, 10_000)
        if clause is not None:
            stmt = stmt.where(clause)
        stmt, _ = keyset(stmt, sort, _Paging(limit, decode_cursor(cursor) if cursor else None))  # type: ignore[arg-type]
        return stmt

    def page(self, selector: str | None, limit: int, cursor: str | None) -> float:
        """One page as ``list_devices`` reads it: the page query, then tags and groups of its devices."""
        from sqlalchemy import select

        from corral.server.store.models import DeviceTag, GroupMember

        rows, elapsed = self._run(self.page_statement(selector, None, limit, cursor))
        ids = [r[0] for r in rows[:limit]]
        if ids:
            elapsed += self._run(select(DeviceTag.device_id, DeviceTag.key, DeviceTag.value)
                                 .where(DeviceTag.device_id.in_(ids)))[1]
            elapsed += self._run(select(GroupMember.device_id, GroupMember.group_name)
                                 .where(GroupMember.device_id.in_(ids)))[1]
        return elapsed

    def count(self, selector: str) -> tuple[float, int]:
        """A dynamic group's size as ``group_view`` computes it."""
        from sqlalchemy import func, select

        from corral.server.registry import members_clause
        from corral.server.store.models import Device, Group

        stmt = select(func.count()).select_from(Device).where(members_clause(Group(name="g", selector=selector)))
        rows, elapsed = self._run(stmt)
        return elapsed, int(rows[0][0])


# --- measuring ----------------------------------------------------------------------------------


def walk_pages(c: Any, path: str, params: dict[str, Any], samples: int, warmup: int = 3
               ) -> tuple[list[float], list[str | None], int]:
    """GET ``path`` page after page (following ``next_cursor``, restarting at the end) until
    ``samples`` timed pages; returns the timings, the cursor of each timed page, total items."""
    times: list[float] = []
    cursors: list[str | None] = []
    cursor: str | None = None
    done = -warmup
    items = 0
    while done < samples:
        q = dict(params)
        if cursor:
            q["cursor"] = cursor
        t0 = time.perf_counter()
        r = c.get(path, params=q)
        dt = time.perf_counter() - t0
        r.raise_for_status()
        body = r.json()
        if done >= 0:
            times.append(dt)
            cursors.append(cursor)
            items += len(body["items"])
        done += 1
        cursor = body.get("next_cursor")
    return times, cursors, items


def full_listing(c: Any, path: str, limit: int) -> tuple[float, int, list[str | None]]:
    """All members, page after page; returns the total time, the count and each page's cursor."""
    cursor: str | None = None
    cursors: list[str | None] = []
    n = 0
    t0 = time.perf_counter()
    while True:
        cursors.append(cursor)
        r = c.get(path, params={"limit": limit, **({"cursor": cursor} if cursor else {})})
        r.raise_for_status()
        body = r.json()
        n += len(body["items"])
        cursor = body.get("next_cursor")
        if not cursor:
            break
    return time.perf_counter() - t0, n, cursors


def run(devices: int, samples: int, group_samples: int, listing_runs: int, quick: bool,
        workdir: Path | None = None) -> dict[str, Any]:
    params = {"devices": devices, "page_limit": 50, "page_samples_per_selector": samples,
              "group_eval_samples": group_samples, "member_listing_runs": listing_runs,
              "member_page_limit": 1000}
    result = new_result("registry", "Registry: selector pages and dynamic groups", params, quick)
    result["method"] = (
        f"{devices:,} devices written straight into a fresh server's SQLite database (95 % accepted, "
        "tags `site` (20 values), `hw_rev`, `env`, an agent-like inventory, 60 % of the accepted "
        "online, a 1,000-member static group), then timed over HTTP against the real server "
        "process: a 50-device page of `GET /api/v1/devices?selector=...` per selector (walking the "
        "pages with `next_cursor`, so deep pages are sampled too), a dynamic group's full evaluation "
        "(`GET /api/v1/groups/NAME`: its size, with the selector pushed down to SQL as a `COUNT`), "
        "and listing all its members (`GET /api/v1/groups/NAME/devices?limit=1000` to the end). "
        "**Reference**: the same SQL statements, compiled from the same SQLAlchemy code with the same "
        "parameters and cursors, run with Python's `sqlite3` on the same database file (for a page: "
        "the page query plus the tag and group look-ups of its devices)."
    )
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="corral-bench-registry-"))
    server = CorralServer(tmp, extra_args=["--heartbeat-interval", "600"])  # keeps seeded devices online
    server.init()
    t0 = time.perf_counter()
    counts = populate(server.db_path, devices)
    result["details"]["populate_s"] = time.perf_counter() - t0
    result["details"]["counts"] = counts
    print(f"registry: {devices:,} devices written in {result['details']['populate_s']:.1f} s", flush=True)
    server.start()
    raw: RawQueries | None = None
    try:
        raw = RawQueries(server.db_path)
        counts["online"] = mark_online(server.db_path, 0.6)
        with server.client() as c:
            # --- device list pages ---
            page_figs: list[Figure] = []
            worst_p99 = 0.0
            for label, sel in LIST_SELECTORS:
                matches = raw.count(sel)[1]
                times, cursors, _ = walk_pages(c, "/devices", {"selector": sel, "limit": 50}, samples)
                for cur in cursors[:3]:  # warm-up, as the REST walk had
                    raw.page(sel, 50, cur)
                ref = [raw.page(sel, 50, cur) for cur in cursors]
                s, rs = summarize_ms(times), summarize_ms(ref)
                result["details"][f"page[{label}]"] = {"selector": sel, "matches": matches, "corral_ms": s,
                                                       "reference_ms": rs}
                worst_p99 = max(worst_p99, s["p99"])
                print(f"registry: page [{label}] {sel!r} ({matches:,} matches): p50 {s['p50']:.1f} ms, "
                      f"p99 {s['p99']:.1f} ms; sqlite3 p50 {rs['p50']:.2f} ms", flush=True)
                page_figs += [
                    Figure(f"device list page p50 — {label}", s["p50"], "ms", rs["p50"],
                           note=f"`{sel}`, {matches:,} matches"),
                    Figure(f"device list page p99 — {label}", s["p99"], "ms", rs["p99"],
                           goal=f"< {PAGE_GOAL_MS:.0f} ms", met=s["p99"] < PAGE_GOAL_MS),
                ]
            add_figures(result, *page_figs)

            # --- dynamic groups ---
            for name, sel in GROUPS:
                r = c.post("/groups", json={"name": name, "selector": sel})
                r.raise_for_status()
                size = r.json()["size"]
                for _ in range(2):  # warm-up
                    c.get(f"/groups/{name}").raise_for_status()
                times = []
                for _ in range(group_samples):
                    t0 = time.perf_counter()
                    r = c.get(f"/groups/{name}")
                    times.append(time.perf_counter() - t0)
                    r.raise_for_status()
                raw.count(sel)
                ref = [raw.count(sel)[0] for _ in range(group_samples)]
                s, rs = summarize_ms(times), summarize_ms(ref)
                # all members, page by page
                listing = []
                cursors: list[str | None] = []
                members = 0
                for _ in range(listing_runs):
                    dt, members, cursors = full_listing(c, f"/groups/{name}/devices", 1000)
                    listing.append(dt)
                ref_listing = []
                for _ in range(listing_runs):
                    ref_listing.append(sum(raw.page(sel, 1000, cur) for cur in cursors))
                ls, rls = summarize_ms(listing), summarize_ms(ref_listing)
                result["details"][f"group[{name}]"] = {
                    "selector": sel, "size": size, "members_listed": members, "pages": len(cursors),
                    "evaluation_corral_ms": s, "evaluation_reference_ms": rs,
                    "listing_corral_ms": ls, "listing_reference_ms": rls,
                }
                print(f"registry: group {name} ({size:,} members): evaluation p99 {s['p99']:.1f} ms "
                      f"(sqlite3 {rs['p99']:.1f} ms); all members in {len(cursors)} pages: "
                      f"{ls['min']:.0f} ms (sqlite3 {rls['min']:.0f} ms)", flush=True)
                add_figures(
                    result,
                    Figure(f"group evaluation (size) p99 — {name}", s["p99"], "ms", rs["p99"],
                           goal=f"< {EVAL_GOAL_MS:.0f} ms", met=s["p99"] < EVAL_GOAL_MS,
                           note=f"`{sel}`, {size:,} members"),
                    Figure(f"all members listed — {name}", min(listing) * 1000, "ms", min(ref_listing) * 1000,
                           goal=f"< {EVAL_GOAL_MS:.0f} ms", met=min(listing) * 1000 < EVAL_GOAL_MS,
                           note=f"{members:,} devices in {len(cursors)} pages of 1,000, best of {listing_runs}"),
                )
            server.check_alive()
    finally:
        if raw is not None:
            raw.close()
        server.stop()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["notes"] = [
        f"The server's SQLite database holds {counts['devices']:,} devices, {counts['tags']:,} tag rows; "
        f"{counts.get('online', 0):,} online.",
        "2 CPUs are shared by the server, the httpx client and the reference; the client's own time "
        "(HTTP round trip, JSON decoding) is inside the Corral figures.",
        "A page walk restarts from the first page when a selector's pages run out, so a selector with "
        "few matches is sampled mostly on its first pages.",
    ]
    return result


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=100, help="timed pages per selector")
    ap.add_argument("--group-samples", type=int, default=10, help="timed evaluations per group")
    ap.add_argument("--listing-runs", type=int, default=2, help="full member listings per group")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3,000 devices, few samples")
    ap.add_argument("--workdir", type=Path, help="keep the server's data here (default: a temp dir)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    return ap


def main_result(argv: list[str] | None = None) -> dict[str, Any]:
    """Run with command-line style arguments; returns the result (not saved)."""
    a = _parser().parse_args(argv)
    if a.quick:
        a.devices, a.samples, a.group_samples, a.listing_runs = min(a.devices, 3000), 10, 5, 1
    return run(a.devices, a.samples, a.group_samples, a.listing_runs, a.quick, a.workdir)


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    finish(main_result(argv), docs=not a.no_docs)


if __name__ == "__main__":
    main()

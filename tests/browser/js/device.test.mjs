// The device page's pure part (corral/web/static/device-lib.js), under node's own test runner;
// tests/browser/test_console_js.py runs it.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";

import {
  chunks, control, downloadName, downloadProblem, hex, humanBytes, queryPath, seriesLabel, toColumns, uploadTarget,
} from "../../../corral/web/static/device-lib.js";

test("a range's parameters become the metrics query", () => {
  const path = queryPath("d3v1ce", "cpu.percent", { since: "15m", step: "10s", agg: "avg" });
  const [base, query] = path.split("?");
  assert.equal(base, "/api/v1/metrics/query");
  assert.deepEqual(Object.fromEntries(new URLSearchParams(query)),
    { metric: "cpu.percent", device: "d3v1ce", since: "15m", step: "10s", agg: "avg" });
  // a metric name with characters that mean something in a URL stays one parameter
  const odd = new URLSearchParams(queryPath("d", "app.a&b=c", { since: "1h", step: "30s", agg: "avg" }).split("?")[1]);
  assert.equal(odd.get("metric"), "app.a&b=c");
});

test("series become uPlot's columns: times in seconds, a gap where a series has no point", () => {
  const columns = toColumns([
    { key: { device: "a" }, points: [[3000, 1.5], [1000, 0.5]] },
    { key: { device: "b" }, points: [[2000, 7], [3000, 8]] },
  ]);
  assert.deepEqual(columns, [[1, 2, 3], [0.5, null, 1.5], [null, 7, 8]]);
  assert.deepEqual(toColumns([]), [[]]);
  assert.deepEqual(toColumns([{ key: {}, points: [] }]), [[], []]);
});

test("a series' label is its key, or the metric for a single device", () => {
  assert.equal(seriesLabel({}, "cpu.percent"), "cpu.percent");
  assert.equal(seriesLabel({ "tag.site": "berlin" }, "cpu.percent"), "tag.site=berlin");
});

test("an upload's target: a directory keeps the file's name", () => {
  assert.equal(uploadTarget("/var/lib/corral/files/", "a.conf"), "/var/lib/corral/files/a.conf");
  assert.equal(uploadTarget("  /srv/x.conf ", "a.conf"), "/srv/x.conf");
  assert.equal(downloadName("/var/log/app.log"), "app.log");
  assert.equal(downloadName("/var/log/"), "log");
  assert.equal(downloadName("/"), "download");
});

test("chunks cover the file once, none larger than asked", () => {
  assert.deepEqual([...chunks(0, 4)], []);
  assert.deepEqual([...chunks(10, 4)], [[0, 4], [4, 8], [8, 10]]);
  assert.deepEqual([...chunks(8, 4)], [[0, 4], [4, 8]]);
});

test("hex is the digest's usual spelling", () => {
  const data = new TextEncoder().encode("corral");
  const digest = createHash("sha256").update(data).digest();
  assert.equal(hex(digest.buffer.slice(digest.byteOffset, digest.byteOffset + digest.length)),
    createHash("sha256").update(data).digest("hex"));
  assert.equal(hex(new Uint8Array([0, 15, 255]).buffer), "000fff");
});

test("a download is checked: announced size, bytes received, the device's SHA-256", () => {
  const sha = "ab".repeat(32);
  assert.equal(downloadProblem(5, 5, sha, sha), "");
  assert.equal(downloadProblem(5, 5, sha.toUpperCase(), sha), "");
  assert.equal(downloadProblem(5, 5, sha, null), ""); // not computed (no crypto.subtle): size only
  assert.equal(downloadProblem(null, 0, sha, sha), "the device sent no file size");
  assert.equal(downloadProblem(5, 4, sha, sha), "4 bytes arrived, the device announced 5");
  assert.equal(downloadProblem(5, 5, sha, "cd".repeat(32)), "the SHA-256 of what arrived is not the device's");
  assert.equal(downloadProblem(5, 5, undefined, sha), "the SHA-256 of what arrived is not the device's");
});

test("control messages: JSON objects only", () => {
  assert.deepEqual(control('{"type": "done", "bytes": 3}'), { type: "done", bytes: 3 });
  assert.deepEqual(control("not json"), {});
  assert.deepEqual(control("[1]"), {});
  assert.deepEqual(control("null"), {});
});

test("sizes for people", () => {
  assert.equal(humanBytes(0), "0 B");
  assert.equal(humanBytes(1023), "1023 B");
  assert.equal(humanBytes(1536), "1.5 KB");
  assert.equal(humanBytes(5 * 1024 * 1024), "5.0 MB");
});

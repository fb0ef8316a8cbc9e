// The artifacts page's pure part (corral/web/static/artifacts-lib.js), under node's own test
// runner; tests/browser/test_console_js.py runs it.
import assert from "node:assert/strict";
import { test } from "node:test";

import { hardwareList, progressText, refusal, tooLarge, uploadPath } from "../../../corral/web/static/artifacts-lib.js";

test("the upload's fields become the API's query parameters; empty optional ones are left out", () => {
  const path = uploadPath({ name: " sensor ", version: "1.2.0", kind: "app", hardware: "rpi4, imx8  x86,",
    commit: "", buildUrl: "  " }, 0);
  const [base, query] = path.split("?");
  assert.equal(base, "/api/v1/artifacts");
  const q = new URLSearchParams(query);
  assert.equal(q.get("name"), "sensor");
  assert.deepEqual(q.getAll("hardware"), ["rpi4", "imx8", "x86"]);
  assert.equal(q.has("commit") || q.has("build_url") || q.has("sbom_size"), false);
  // with an SBOM its size leads the body; a value with &, = or # stays one parameter
  const odd = new URLSearchParams(uploadPath({ name: "a&b=c", version: "1#2", kind: "script", commit: "abc1234",
    buildUrl: "https://ci.example/job?id=1&x=2" }, 321).split("?")[1]);
  assert.deepEqual(Object.fromEntries(odd), { name: "a&b=c", version: "1#2", kind: "script", commit: "abc1234",
    build_url: "https://ci.example/job?id=1&x=2", sbom_size: "321" });
});

test("hardware models are separated by commas or spaces", () => {
  assert.deepEqual(hardwareList(""), []);
  assert.deepEqual(hardwareList(" , "), []);
  assert.deepEqual(hardwareList("a,b c"), ["a", "b", "c"]);
});

test("files over the server's limits are refused with its own words before a byte is sent", () => {
  const limits = { maxBytes: 1000, maxSbomBytes: 100 };
  assert.equal(tooLarge(1000, 100, limits), "");
  assert.equal(tooLarge(1001, 0, limits), "the artifact is larger than 1000 bytes (max_artifact_bytes)");
  assert.equal(tooLarge(5, 101, limits), "the SBOM is larger than 100 bytes (max_sbom_bytes)");
});

test("progress reads as bytes and whole percents", () => {
  assert.equal(progressText(0, 2048), "0 B of 2.0 KB (0%)");
  assert.equal(progressText(1536, 3 * 1024 * 1024), "1.5 KB of 3.0 MB (0%)");
  assert.equal(progressText(999, 1000), "999 B of 1000 B (99%)");
  assert.equal(progressText(0, 0), "0 B of 0 B (0%)");
});

test("a refusal is the API's detail, else the status", () => {
  assert.equal(refusal(409, JSON.stringify({ error: "conflict", detail: "artifact a@1 exists" })), "artifact a@1 exists");
  assert.equal(refusal(502, "<html>Bad gateway</html>"), "the server answered 502");
  assert.equal(refusal(400, JSON.stringify({ detail: ["not a string"] })), "the server answered 400");
});

// The playback page's pure part (corral/web/static/asciicast.js), under node's own test runner;
// tests/browser/test_console_js.py runs it.
import assert from "node:assert/strict";
import { test } from "node:test";

import { CastError, delayMs, parseCast, parseSize } from "../../../corral/web/static/asciicast.js";

const header = JSON.stringify({ version: 2, width: 100, height: 30, timestamp: 1 });

test("a recording's header and events", () => {
  const cast = parseCast([header, '[0.5, "o", "hi\\r\\n"]', '[1.25, "r", "120x40"]', ""].join("\n"));
  assert.equal(cast.width, 100);
  assert.equal(cast.height, 30);
  assert.deepEqual(cast.events, [
    { time: 0.5, kind: "o", data: "hi\r\n" },
    { time: 1.25, kind: "r", data: "120x40" },
  ]);
});

test("a line cut short at the end is skipped, the rest plays", () => {
  const cast = parseCast([header, '[0.1, "o", "a"]', '[0.2, "o", "b'].join("\n"));
  assert.deepEqual(cast.events.map((e) => e.data), ["a"]);
});

test("what is not asciicast v2 is refused with a reason", () => {
  assert.throws(() => parseCast(""), CastError);
  assert.throws(() => parseCast("not json\n"), /header is not JSON/);
  assert.throws(() => parseCast('{"version": 1}\n'), /not an asciicast v2/);
});

test("sizes", () => {
  assert.deepEqual(parseSize("120x40"), { cols: 120, rows: 40 });
  assert.equal(parseSize("120x"), null);
  assert.equal(parseSize("x40; drop"), null);
});

test("delays follow the recording and the speed, idle gaps are shortened", () => {
  assert.equal(delayMs(0, 0.5, 1), 500);
  assert.equal(delayMs(0, 0.5, 2), 250);
  assert.equal(delayMs(1, 61, 1), 2000); // a minute of idling plays as two seconds
  assert.equal(delayMs(2, 1, 1), 0); // never backwards
});

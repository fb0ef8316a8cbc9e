// The device page's pure parts (tested by node's test runner: tests/browser/js/device.test.mjs):
// the chart's query and columns, and the file transfer's paths, digests and checks.

// --- the chart ------------------------------------------------------------------------------------

// The metrics query for one metric of one device over a time range. The range's parameters
// (since, step, agg) are the server's (corral.server.console_device.range_params), rendered
// into the page as data attributes of each range's radio button.
export function queryPath(device, metric, range) {
  const q = new URLSearchParams({ metric, device, since: range.since, step: range.step, agg: range.agg });
  return `/api/v1/metrics/query?${q}`;
}

// The API's series ([{key, points: [[ts_ms, value], ...]}, ...]) as uPlot's columns: the times
// in seconds (ascending, each once), then one column of values per series, null where that
// series has no point at that time (uPlot draws a gap).
export function toColumns(series) {
  const times = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
  const at = new Map(times.map((t, i) => [t, i]));
  const columns = [times.map((t) => t / 1000)];
  for (const s of series) {
    const values = new Array(times.length).fill(null);
    for (const [t, v] of s.points) values[at.get(t)] = v;
    columns.push(values);
  }
  return columns;
}

// A series' name in the legend: its key (e.g. device=ID) or, for a single device, the metric.
export function seriesLabel(key, metric) {
  const parts = Object.entries(key || {}).map(([k, v]) => `${k}=${v}`);
  return parts.length ? parts.join(" ") : metric;
}

// --- file transfer --------------------------------------------------------------------------------

// Where an upload goes: the path typed, or the file's own name in it when the path ends in "/".
export function uploadTarget(path, fileName) {
  const p = path.trim();
  return p.endsWith("/") ? p + fileName : p;
}

// The name a downloaded file is saved under: the last part of the device's path.
export function downloadName(path) {
  const parts = path.trim().split("/").filter(Boolean);
  return parts.length ? parts[parts.length - 1] : "download";
}

export function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

// [start, end) of each chunk of a file of `size` bytes (the relay refuses messages over 256 KiB).
export function* chunks(size, chunkBytes) {
  for (let start = 0; start < size; start += chunkBytes) yield [start, Math.min(size, start + chunkBytes)];
}

// What is wrong with a download at its end ("" when nothing): the size the device announced
// and the SHA-256 it sent after the bytes, against what arrived (sha256 null: not computed).
export function downloadProblem(announced, received, expectedSha, sha256) {
  if (announced === null) return "the device sent no file size";
  if (received !== announced) return `${received} bytes arrived, the device announced ${announced}`;
  if (sha256 !== null && sha256 !== String(expectedSha || "").toLowerCase()) {
    return "the SHA-256 of what arrived is not the device's";
  }
  return "";
}

// A session's control message (JSON text), or {} for anything else.
export function control(text) {
  try {
    const doc = JSON.parse(text);
    return doc && typeof doc === "object" && !Array.isArray(doc) ? doc : {};
  } catch {
    return {};
  }
}

export function humanBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KB", "MB", "GB"];
  let size = n / 1024;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${size.toFixed(1)} ${units[unit]}`;
}

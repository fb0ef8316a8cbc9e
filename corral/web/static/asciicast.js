// Asciicast v2, the format the server records terminal sessions in (ADR 0016): a JSON header
// line ({"version": 2, "width", "height", ...}), then one JSON array per event:
// [seconds since the start, "o", output] or [seconds, "r", "COLSxROWS"]. Pure functions, so the
// player's timing can be reasoned about apart from the DOM.

export class CastError extends Error {}

export function parseCast(text) {
  const lines = text.split("\n").filter((line) => line.trim() !== "");
  if (lines.length === 0) throw new CastError("the recording is empty");
  let header;
  try {
    header = JSON.parse(lines[0]);
  } catch {
    throw new CastError("the recording's header is not JSON");
  }
  if (header === null || typeof header !== "object" || header.version !== 2) {
    throw new CastError("not an asciicast v2 recording");
  }
  const events = [];
  for (const line of lines.slice(1)) {
    let event;
    try {
      event = JSON.parse(line);
    } catch {
      continue; // a line cut short when the server stopped: the rest still plays
    }
    if (Array.isArray(event) && event.length >= 3 && typeof event[0] === "number" && typeof event[2] === "string") {
      events.push({ time: event[0], kind: event[1], data: event[2] });
    }
  }
  return { width: Number(header.width) || 80, height: Number(header.height) || 24, events };
}

// "120x40" -> {cols: 120, rows: 40}, or null for anything else
export function parseSize(data) {
  const m = /^(\d{1,4})x(\d{1,4})$/.exec(data);
  return m ? { cols: Number(m[1]), rows: Number(m[2]) } : null;
}

// How long to wait before an event, in milliseconds: the recorded gap at the chosen speed, with
// long idle stretches shortened to idleLimit seconds (as asciinema's idle_time_limit does).
export function delayMs(previousTime, time, speed, idleLimit = 2) {
  const gap = Math.min(Math.max(time - previousTime, 0), idleLimit);
  return (gap * 1000) / speed;
}

// A remote-access session from the console (ADR 0016): POST /api/v1/devices/ID/sessions with
// the console's cookie and the page's CSRF token returns a single-use token; the session's
// WebSocket /api/v1/sessions/SID/ws?token=... is authenticated by the same cookie. Binary
// messages are the stream's bytes, text messages JSON controls. terminal.js and transfer.js.

export async function createSession(device, csrf, kind, params) {
  const response = await fetch(`/api/v1/devices/${encodeURIComponent(device)}/sessions`, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify({ kind, params }),
  });
  const doc = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(doc.detail || `the server answered ${response.status}`);
  return doc;
}

export function openSocket(session) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}${session.ws_path}?token=${encodeURIComponent(session.token)}`);
  ws.binaryType = "arraybuffer";
  return ws;
}

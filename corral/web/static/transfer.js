// File transfer in the browser (issue 7), the protocol `corral cp` speaks (corral/cli/remote.py,
// corral/agent/remote/files.py) over a remote-access session's WebSocket:
//
// - upload: POST /api/v1/devices/ID/sessions {kind: "upload", params: {path, size, sha256}}
//   (the SHA-256 computed here with crypto.subtle), then the file's bytes as binary messages of
//   32 KiB, then {"type": "eof"}; the device answers {"type": "done", bytes, sha256} once the
//   file is in place, or {"type": "error", message}.
// - download: {kind: "download", params: {path}}; the device sends {"type": "file", size}, the
//   bytes, then {"type": "eof", sha256}, or {"type": "error", message}. The bytes are checked
//   and saved through a Blob link.
//
// The device's refusals (a path outside its allowed directories, a file too large) arrive as
// {"type": "error"} and are shown as they are.
import { createSession, openSocket } from "/static/session.js";
import { chunks, control, downloadName, downloadProblem, hex, humanBytes, uploadTarget } from "/static/device-lib.js";

const CHUNK = 32 * 1024;
// bytes handed to the socket and not yet sent, at most: memory stays small, progress honest
const HIGH_WATER = 1024 * 1024;
// how long an upload of more than one message waits after its first for the device's refusal
const REFUSAL_WAIT_MS = 600;

class Refused extends Error {}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function closedEarly(event, what) {
  return new Refused(`the session closed before ${what}` +
    (event.reason ? ` (${event.reason})` : event.code && event.code !== 1000 ? ` (code ${event.code})` : ""));
}

async function sha256(data) {
  return hex(await crypto.subtle.digest("SHA-256", data));
}

async function upload(box, file, path, progress) {
  if (!window.crypto || !crypto.subtle) {
    throw new Refused("uploading needs the browser's SHA-256 (crypto.subtle), which it only offers on https " +
      "or localhost pages: use corral cp, or reach the server over https");
  }
  const data = await file.arrayBuffer();
  const digest = await sha256(data);
  const params = { path, size: data.byteLength, sha256: digest };
  const session = await createSession(box.dataset.device, box.dataset.csrf, "upload", params);
  const ws = openSocket(session);
  let settled = false;
  const outcome = new Promise((resolve, reject) => {
    ws.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      const doc = control(event.data);
      if (doc.type === "done") {
        settled = true;
        resolve(doc);
      } else if (doc.type === "error") {
        settled = true;
        reject(new Refused(doc.message || "the device refused the upload"));
      }
    });
    ws.addEventListener("close", (event) => {
      if (!settled) {
        settled = true;
        reject(closedEarly(event, "the device confirmed the copy"));
      }
    });
  });
  outcome.catch(() => {}); // read below; a refusal while sending must not go unhandled meanwhile
  await new Promise((resolve) => {
    ws.addEventListener("open", resolve, { once: true });
    ws.addEventListener("close", resolve, { once: true });
  });
  let first = true;
  for (const [start, end] of chunks(data.byteLength, CHUNK)) {
    while (!settled && ws.bufferedAmount > HIGH_WATER) await sleep(10);
    if (settled || ws.readyState !== WebSocket.OPEN) break;
    ws.send(data.slice(start, end));
    progress(end - ws.bufferedAmount, data.byteLength);
    if (first && end < data.byteLength) {
      // The device refuses (path, size, space) as soon as it has the session. Its refusal could
      // be lost if it came while more of the file was in flight (the server closes the socket
      // with bytes unread: a reset), so the rest waits a moment for it.
      first = false;
      for (let waited = 0; waited < REFUSAL_WAIT_MS && !settled; waited += 20) await sleep(20);
    }
  }
  if (!settled && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "eof" }));
  const done = await outcome;
  progress(data.byteLength, data.byteLength);
  ws.close();
  return done;
}

async function download(box, path, progress) {
  const session = await createSession(box.dataset.device, box.dataset.csrf, "download", { path });
  const ws = openSocket(session);
  const parts = [];
  let announced = null;
  let received = 0;
  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (error) => {
      if (settled) return;
      settled = true;
      ws.close();
      reject(error);
    };
    ws.addEventListener("message", async (event) => {
      if (settled) return;
      if (typeof event.data !== "string") {
        parts.push(event.data);
        received += event.data.byteLength;
        if (announced !== null && received > announced) {
          fail(new Refused(`the device sent more than the ${announced} bytes it announced`));
          return;
        }
        progress(received, announced);
        return;
      }
      const doc = control(event.data);
      if (doc.type === "file") {
        announced = Number(doc.size);
        progress(0, announced);
      } else if (doc.type === "error") {
        fail(new Refused(doc.message || "the device refused the download"));
      } else if (doc.type === "eof") {
        settled = true;
        const blob = new Blob(parts, { type: "application/octet-stream" });
        const digest = window.crypto && crypto.subtle ? await sha256(await blob.arrayBuffer()) : null;
        const problem = downloadProblem(announced, received, doc.sha256, digest);
        ws.close();
        if (problem) reject(new Refused(`the copy is not the device's file: ${problem}`));
        else resolve({ blob, bytes: received, sha256: digest });
      }
    });
    ws.addEventListener("close", (event) => fail(closedEarly(event, "the end of the file")));
  });
}

export function setupTransfer(box) {
  if (!box) return;
  const statusLine = document.getElementById("transfer-status");
  const bar = document.getElementById("transfer-progress");
  const saved = document.getElementById("transfer-saved");
  const buttons = box.querySelectorAll("button");
  let savedUrl = null;

  const show = (text, kind = "") => {
    statusLine.hidden = false;
    statusLine.textContent = text;
    statusLine.className = "status" + (kind ? " " + kind : "");
    statusLine.setAttribute("role", kind === "error" ? "alert" : "status");
  };
  const progress = (done, total) => {
    bar.hidden = false;
    if (total) {
      bar.max = total;
      bar.value = Math.max(0, done);
      bar.textContent = `${Math.round((100 * done) / total)}%`;
    } else {
      bar.removeAttribute("value");
    }
  };
  const busy = (on) => {
    for (const b of buttons) b.disabled = on;
  };
  async function run(what, work) {
    busy(true);
    bar.hidden = true;
    show(`${what}…`);
    try {
      await work();
    } catch (error) {
      show(`${what} failed: ${error.message || error}`, "error");
    } finally {
      busy(false);
    }
  }

  document.getElementById("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = document.getElementById("upload-file").files[0];
    if (!file) return;
    const path = uploadTarget(document.getElementById("upload-path").value, file.name);
    run(`Uploading ${file.name} to ${path}`, async () => {
      const done = await upload(box, file, path, (n, total) => {
        progress(n, total);
        show(`Uploading ${file.name} to ${path}: ${humanBytes(Math.max(0, n))} of ${humanBytes(total)}…`);
      });
      show(`Uploaded ${file.name} to ${path}: ${done.bytes} bytes, SHA-256 ${done.sha256} checked by the device.`, "ok");
    });
  });

  document.getElementById("download-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const path = document.getElementById("download-path").value.trim();
    const name = downloadName(path);
    run(`Downloading ${path}`, async () => {
      const got = await download(box, path, (n, total) => {
        progress(n, total);
        show(`Downloading ${path}: ${humanBytes(n)}${total !== null ? ` of ${humanBytes(total)}` : ""}…`);
      });
      if (savedUrl) URL.revokeObjectURL(savedUrl);
      savedUrl = URL.createObjectURL(got.blob);
      const link = document.createElement("a");
      link.href = savedUrl;
      link.download = name;
      link.id = "transfer-link";
      link.textContent = `Save ${name} again (${humanBytes(got.bytes)})`;
      saved.replaceChildren(link);
      saved.hidden = false;
      show(`Downloaded ${path}: ${got.bytes} bytes` +
        (got.sha256 ? `, SHA-256 ${got.sha256} checked.` : " (size checked; SHA-256 needs https)."), "ok");
      link.click();
    });
  });
}

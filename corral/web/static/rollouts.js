// The rollout pages (console_updates.py): a rollout's progress follows the server's live stream
// (server-sent events of the page's state, corral.server.live) without reloading; the new-rollout
// form says how many devices the selector matches and how big each wave would be, as it is typed.
// Everything is written with textContent and attributes: no value becomes markup.

const SVG = "http://www.w3.org/2000/svg";

function text(id, value) {
  const el = document.getElementById(id);
  if (el && el.textContent !== String(value)) el.textContent = String(value);
  return el;
}

function cell(content, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.append(content);
  else td.textContent = String(content);
  return td;
}

function deviceRow(d) {
  const tr = document.createElement("tr");
  const link = document.createElement("a");
  link.className = "mono";
  link.href = `/devices/${encodeURIComponent(d[0])}`;
  link.textContent = d[0];
  const badge = document.createElement("span");
  badge.className = `badge state-${d[2]}`;
  badge.textContent = d[2];
  tr.append(cell(link), cell(d[1]), cell(badge), cell(d[3], "wide-only"), cell(d[4]), cell(d[5], "wide-only"),
    cell(d[6], "wide-only"), cell(d[7], "wide-only"), cell(d[8]));
  return tr;
}

function showWave(w) {
  const li = document.getElementById(`wave-${w.wave}`);
  if (!li) return;
  li.classList.toggle("current", w.current);
  const svg = li.querySelector("svg.bar");
  svg.setAttribute("aria-label", `Wave ${w.wave}: ${w.text}`);
  svg.querySelectorAll("rect:not(.bar-bg)").forEach((r) => r.remove());
  for (const [state, x, width] of w.segments) {
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("class", `seg-${state}`);
    rect.setAttribute("x", x);
    rect.setAttribute("y", "0");
    rect.setAttribute("width", width);
    rect.setAttribute("height", "4");
    svg.append(rect);
  }
  li.querySelector(".counts").textContent = w.text;
}

function showRollout(root, s) {
  const status = text("r-status", s.status);
  status.className = `badge rollout-${s.status}`;
  const reason = text("r-reason", s.reason);
  const label = document.getElementById("r-reason-label");
  reason.hidden = label.hidden = !s.reason;
  label.textContent = s.status === "paused" ? "Paused because" : "Reason";
  text("r-wave", s.current_wave);
  const progress = document.getElementById("r-progress");
  progress.max = Math.max(s.devices, 1);
  progress.value = s.done;
  text("r-progress-text", `${s.done} of ${s.devices}`);
  s.waves.forEach(showWave);
  for (const [name, [level, value]] of Object.entries(s.gates)) {
    const gate = text(`gate-${name}`, value);
    if (gate) gate.className = `gate ${level}`;
  }
  root.querySelectorAll("form[data-when]").forEach((form) => {
    form.hidden = !form.dataset.when.split(" ").includes(s.status);
  });
  const body = document.getElementById("r-devices");
  if (s.rows.length) body.replaceChildren(...s.rows.map(deviceRow));
  root.dataset.status = s.status;
}

function follow(root) {
  const source = new EventSource(root.dataset.live);
  source.addEventListener("state", (event) => showRollout(root, JSON.parse(event.data)));
  // a finished rollout changes no more: stop listening (the browser would reconnect forever)
  source.addEventListener("state", (event) => {
    if (JSON.parse(event.data).final) source.close();
  });
}

function matchingCount(form) {
  const selector = form.querySelector("#selector");
  const waves = form.querySelector("#waves");
  const matching = document.getElementById("matching");
  const sizes = document.getElementById("wave-sizes");
  let timer = 0;
  let asked = 0;
  async function ask() {
    const n = ++asked;
    const query = new URLSearchParams({ selector: selector.value, waves: waves.value });
    let doc;
    try {
      const response = await fetch(`/rollouts/new/matching?${query}`, { credentials: "same-origin" });
      doc = await response.json();
    } catch {
      return;
    }
    if (n !== asked) return; // an answer to an older question
    if (!selector.value.trim()) matching.textContent = "";
    else if (doc.error) matching.textContent = `Not a selector: ${doc.error}`;
    else matching.textContent = `${doc.count} accepted device${doc.count === 1 ? "" : "s"} match.`;
    if (doc.waves_error) sizes.textContent = doc.waves_error;
    else if (doc.waves.length) sizes.textContent = `Devices per wave: ${doc.waves.join(", ")}.`;
    else sizes.textContent = "";
  }
  const soon = () => {
    clearTimeout(timer);
    timer = setTimeout(ask, 250);
  };
  selector.addEventListener("input", soon);
  waves.addEventListener("input", soon);
  if (selector.value.trim()) ask();
}

const root = document.getElementById("rollout");
if (root && root.dataset.live) follow(root);
const form = document.getElementById("rollout-form");
if (form) matchingCount(form);

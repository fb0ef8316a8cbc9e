// The device page (issue 7): presence kept live, the metric chart, and file transfer.
//
// Presence: an EventSource on /devices/ID/live (corral.server.live) sends the device's online
// state and last-seen time whenever they change. The chart fetches /api/v1/metrics/query for the
// chosen metric and time range (the range's parameters are the server's, in data attributes)
// and draws it with uPlot. File transfer is in transfer.js.
import uPlot from "/static/vendor/uplot/uPlot.esm.js";
import { queryPath, seriesLabel, toColumns } from "/static/device-lib.js";
import { setupTransfer } from "/static/transfer.js";

function setStatus(element, text, kind = "") {
  element.textContent = text;
  element.className = "status" + (kind ? " " + kind : "");
}

// --- presence ------------------------------------------------------------------------------------

function watchPresence() {
  const box = document.getElementById("presence");
  if (!box || !window.EventSource) return;
  const online = document.getElementById("presence-online");
  const status = document.getElementById("presence-status");
  const seen = document.getElementById("presence-seen");
  const source = new EventSource(box.dataset.live);
  source.addEventListener("state", (event) => {
    const state = JSON.parse(event.data);
    if (state.gone) {
      source.close();
      return;
    }
    online.textContent = state.online ? "online" : "offline";
    online.className = "badge " + (state.online ? "ok" : "off");
    status.textContent = state.status;
    seen.textContent = state.last_seen_text || "never";
    seen.dateTime = state.last_seen || "";
  });
}

// --- the chart ------------------------------------------------------------------------------------

function setupChart() {
  const box = document.getElementById("chart");
  if (!box) return;
  const metricSelect = document.getElementById("metric");
  const statusLine = document.getElementById("chart-status");
  let plot = null;
  let asked = 0;

  const width = () => Math.max(280, box.clientWidth);
  const selectedRange = () => document.querySelector('input[name="range"]:checked');

  async function draw() {
    const metric = metricSelect.value;
    const range = selectedRange();
    const mine = ++asked;
    setStatus(statusLine, `Loading ${metric}…`);
    let doc;
    try {
      const response = await fetch(queryPath(box.dataset.device, metric, range.dataset),
        { credentials: "same-origin", headers: { Accept: "application/json" } });
      doc = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(doc.detail || `the server answered ${response.status}`);
    } catch (error) {
      if (mine === asked) setStatus(statusLine, `Could not load ${metric}: ${error.message}`, "error");
      return;
    }
    if (mine !== asked) return; // a later choice is on its way
    const columns = toColumns(doc.series);
    const points = columns[0].length;
    if (plot) plot.destroy();
    plot = null;
    box.dataset.points = String(points);
    box.dataset.metric = metric;
    box.dataset.range = range.value;
    const label = range.parentElement.textContent.trim();
    if (!points) {
      setStatus(statusLine, `No ${metric} in the last ${label}.`, "warn");
      return;
    }
    const series = [{}, ...doc.series.map((s) => ({
      label: seriesLabel(s.key, metric), stroke: "#0b5cad", width: 2, fill: "rgba(11, 92, 173, 0.08)",
      spanGaps: false,
    }))];
    plot = new uPlot({ width: width(), height: 260, series, scales: { x: { time: true } },
      axes: [{}, { size: 60 }] }, columns, box);
    setStatus(statusLine, `${metric}, last ${label}: ${points} points (${doc.agg} per ${doc.step_s} s).`, "ok");
  }

  metricSelect.addEventListener("change", draw);
  for (const radio of document.querySelectorAll('input[name="range"]')) radio.addEventListener("change", draw);
  window.addEventListener("resize", () => {
    if (plot) plot.setSize({ width: width(), height: 260 });
  });
  draw();
}

watchPresence();
setupChart();
setupTransfer(document.getElementById("files"));

// What the terminal and the playback pages share: an xterm.js terminal under our CSP.
//
// xterm.js's DOM renderer writes <style> elements at run time. The page's Content-Security-Policy
// has no 'unsafe-inline' for styles: it allows style elements that carry the response's nonce
// (rendered into <meta name="style-nonce">), so style elements created on this page get it.
import { Terminal } from "/static/vendor/xterm/xterm.mjs";
import { FitAddon } from "/static/vendor/xterm/addon-fit.mjs";

function nonceStyleElements() {
  const meta = document.querySelector('meta[name="style-nonce"]');
  const nonce = meta ? meta.content : "";
  if (!nonce) return;
  const create = document.createElement.bind(document);
  document.createElement = (name, options) => {
    const element = create(name, options);
    if (String(name).toLowerCase() === "style") element.nonce = nonce;
    return element;
  };
}

export function openTerminal(container, options = {}) {
  nonceStyleElements();
  const term = new Terminal({
    cursorBlink: true,
    convertEol: false,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#000000", foreground: "#e6e8eb" },
    ...options,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(container);
  return { term, fit };
}

export function setStatus(element, text, kind = "") {
  element.textContent = text;
  element.className = "status" + (kind ? " " + kind : "");
}

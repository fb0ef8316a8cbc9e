// The artifacts page (console_artifacts.py): the upload form streams the chosen file (after the
// SBOM's bytes, if any) as the raw body of POST /api/v1/artifacts, with the console's cookie and
// the page's CSRF token, as `corral artifact upload` does; the upload's progress is shown, the
// API's refusal beside the form, and the list is read again when it is done. Everything is
// written with textContent: no value becomes markup.
import { progressText, refusal, tooLarge, uploadPath } from "./artifacts-lib.js";
import { humanBytes } from "./device-lib.js";

function send(path, body, csrf, onProgress) {
  const xhr = new XMLHttpRequest();
  const done = new Promise((resolve) => {
    xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : body.size));
    xhr.addEventListener("load", () => resolve({ status: xhr.status, body: xhr.responseText }));
    xhr.addEventListener("error", () => resolve({ status: 0, body: "" }));
    xhr.addEventListener("abort", () => resolve({ status: -1, body: "" }));
  });
  xhr.open("POST", path);
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  xhr.setRequestHeader("X-CSRF-Token", csrf);
  xhr.send(body);
  return { xhr, done };
}

// The list as the server renders it now (the new artifact first): its table replaces ours.
async function reloadList(ref) {
  const response = await fetch("/artifacts", { credentials: "same-origin" });
  if (!response.ok) return;
  const doc = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = doc.getElementById("artifact-list");
  const list = document.getElementById("artifact-list");
  if (!fresh || !list) return;
  list.replaceChildren(...[...fresh.childNodes].map((n) => document.importNode(n, true)));
  for (const row of list.querySelectorAll("tr[data-ref]")) {
    if (row.dataset.ref === ref) row.classList.add("just-uploaded");
  }
}

function setUp(form) {
  const field = (id) => document.getElementById(id);
  const error = field("upload-error");
  const status = field("upload-status");
  const progress = field("upload-progress");
  const button = field("upload-button");
  const cancel = field("upload-cancel");
  const limits = { maxBytes: Number(form.dataset.maxBytes), maxSbomBytes: Number(form.dataset.maxSbomBytes) };
  const csrf = form.querySelector("input[name=csrf_token]").value;
  let current = null;

  function refuse(message) {
    error.textContent = message;
    error.hidden = false;
    status.textContent = "";
    progress.hidden = true;
  }

  cancel.addEventListener("click", () => current && current.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (current) return;
    error.hidden = true;
    error.textContent = "";
    const file = field("up-file").files[0];
    const sbom = field("up-sbom").files[0];
    if (!file) return refuse("Choose the file to upload.");
    const big = tooLarge(file.size, sbom ? sbom.size : 0, limits);
    if (big) return refuse(big);
    const fields = { name: field("up-name").value, version: field("up-version").value, kind: field("up-kind").value,
      hardware: field("up-hardware").value, commit: field("up-commit").value, buildUrl: field("up-build-url").value };
    const body = new Blob(sbom ? [sbom, file] : [file]);
    progress.hidden = false;
    progress.max = Math.max(body.size, 1);
    progress.value = 0;
    status.textContent = `Uploading ${file.name}: ${progressText(0, body.size)}`;
    button.disabled = true;
    cancel.hidden = false;
    const upload = send(uploadPath(fields, sbom ? sbom.size : 0), body, csrf, (loaded, total) => {
      progress.value = loaded;
      status.textContent = `Uploading ${file.name}: ${progressText(loaded, total)}`;
    });
    current = upload.xhr;
    const answer = await upload.done;
    current = null;
    button.disabled = false;
    cancel.hidden = true;
    if (answer.status === 201) {
      const a = JSON.parse(answer.body);
      const ref = `${a.name}@${a.version}`;
      progress.value = progress.max;
      status.textContent = `Uploaded ${ref} (${humanBytes(a.size)}${a.sbom ? `, ${a.sbom.components} SBOM components` : ""}).`;
      form.reset();
      await reloadList(ref);
    } else if (answer.status === -1) {
      refuse("The upload was cancelled.");
    } else if (answer.status === 0) {
      refuse("The connection ended before the server answered: the server may have refused the upload before "
        + "reading it (a version that exists?). Reload the page to see the list.");
    } else {
      refuse(refusal(answer.status, answer.body));
    }
  });
  field("upload-nojs").hidden = true;
  form.hidden = false;
}

const form = document.getElementById("upload-form");
if (form) setUp(form);

// The artifacts page's pure parts (tested by node's test runner: tests/browser/js/artifacts.test.mjs):
// the upload's URL, its size checks, its progress and the API's answer as text.
import { humanBytes } from "./device-lib.js";

// "rpi4, imx8 x86" → ["rpi4", "imx8", "x86"]
export function hardwareList(text) {
  return text.split(/[\s,]+/).filter((h) => h);
}

// The upload's URL: POST /api/v1/artifacts with the fields as query parameters (the body is the
// SBOM's sbomSize bytes, then the artifact's). Empty optional fields are left out.
export function uploadPath(fields, sbomSize) {
  const q = new URLSearchParams({ name: fields.name.trim(), version: fields.version.trim(), kind: fields.kind });
  for (const h of hardwareList(fields.hardware || "")) q.append("hardware", h);
  if ((fields.commit || "").trim()) q.set("commit", fields.commit.trim());
  if ((fields.buildUrl || "").trim()) q.set("build_url", fields.buildUrl.trim());
  if (sbomSize > 0) q.set("sbom_size", String(sbomSize));
  return `/api/v1/artifacts?${q}`;
}

// What the server would answer at once for files over its limits (it refuses before reading the
// body, and a browser still sending may see the connection close instead of the answer): the
// same words, before a byte is sent. "" when both fit.
export function tooLarge(fileSize, sbomSize, limits) {
  if (sbomSize > limits.maxSbomBytes) {
    return `the SBOM is larger than ${limits.maxSbomBytes} bytes (max_sbom_bytes)`;
  }
  if (fileSize > limits.maxBytes) return `the artifact is larger than ${limits.maxBytes} bytes (max_artifact_bytes)`;
  return "";
}

// "1.5 MB of 3.0 MB (50%)"
export function progressText(loaded, total) {
  const percent = total > 0 ? Math.floor((100 * loaded) / total) : 0;
  return `${humanBytes(loaded)} of ${humanBytes(total)} (${percent}%)`;
}

// The API's reason for a refusal (its errors are {error, detail, request_id}), else the status.
export function refusal(status, body) {
  try {
    const doc = JSON.parse(body);
    if (doc && typeof doc.detail === "string" && doc.detail) return doc.detail;
  } catch {
    // not the API's JSON (a proxy's page): the status says what happened
  }
  return `the server answered ${status}`;
}

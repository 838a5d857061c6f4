// medvl's page: no framework, no CDN. Talks to the same server's /v1 API.
"use strict";
const $ = (id) => document.getElementById(id);
let image = null;      // data URI of the chosen file (PNG, JPEG or DICOM)
let vlm = null, clip = null;

function showError(msg) { $("error").textContent = msg || ""; }

async function api(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify(body) });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((j.error && j.error.message) || ("HTTP " + r.status));
  return j;
}

async function loadModels() {
  const r = await fetch("/v1/models");
  const j = await r.json();
  const ids = j.data.map((m) => m.id);
  const info = await fetch("/v1/server").then((x) => x.json()).catch(() => ({}));
  vlm = info.vlm || null; clip = info.clip || null;
  $("models").textContent = "models: " + ids.join(", ");
  $("send").disabled = !vlm; $("classify").disabled = !clip;
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = async () => {
    let uri = reader.result;
    const isDicom = /\.dcm$/i.test(file.name) || file.type === "application/dicom";
    if (isDicom) uri = "data:application/dicom;base64," + uri.split(",")[1];
    image = uri;
    $("fileinfo").textContent = file.name + " (" + Math.round(file.size / 1024) + " kB)";
    await renderPreview();
  };
  reader.readAsDataURL(file);
}

async function renderPreview() {
  if (!image) return;
  showError("");
  try {
    const j = await api("/v1/preview", { image: image, window: $("window").value || null });
    $("preview").src = j.png; $("preview").hidden = false;
  } catch (e) { showError(e.message); }
}

async function ask(ev) {
  ev.preventDefault();
  showError("");
  const q = $("question").value.trim();
  if (!q) { showError("type a question"); return; }
  const content = [{ type: "text", text: q }];
  if (image) content.push({ type: "image_url", image_url: { url: image } });
  $("answer").textContent = ""; $("send").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: vlm, stream: true, max_tokens: 64, messages: [{ role: "user", content }] }) });
    if (!r.ok) { const j = await r.json(); throw new Error(j.error.message); }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, k).trim(); buf = buf.slice(k + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const j = JSON.parse(line.slice(6));
        if (j.error) throw new Error(j.error.message);
        const d = j.choices[0].delta.content;
        if (d) $("answer").textContent += d;
      }
    }
    $("answer").dataset.done = "1";
  } catch (e) { showError(e.message); } finally { $("send").disabled = !vlm; }
}

async function classify(ev) {
  ev.preventDefault();
  showError("");
  if (!image) { showError("choose an image first"); return; }
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  try {
    const j = await api("/v1/zero-shot", { image: image, labels: labels, window: $("window").value || null });
    const bars = $("bars"); bars.textContent = "";
    for (const r of j.ranking) {
      const row = document.createElement("div"); row.className = "bar";
      const name = document.createElement("span"); name.textContent = r.label;
      const track = document.createElement("div"); const fill = document.createElement("div");
      fill.className = "fill"; fill.style.width = (100 * r.prob).toFixed(1) + "%"; track.appendChild(fill);
      const pct = document.createElement("span"); pct.textContent = (100 * r.prob).toFixed(1) + "%";
      row.append(name, track, pct); bars.appendChild(row);
    }
  } catch (e) { showError(e.message); }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) readFile(e.dataTransfer.files[0]); });
$("file").addEventListener("change", (e) => { if (e.target.files.length) readFile(e.target.files[0]); });
$("window").addEventListener("change", renderPreview);
$("ask").addEventListener("submit", ask);
$("zs").addEventListener("submit", classify);
loadModels();

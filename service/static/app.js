// The MUSIQ web page: each picked or dropped image goes to POST /v1/explain (raw body), and its
// score, per-scale heatmaps and place in the ranking are shown. No framework, nothing fetched
// from elsewhere. At most CONCURRENCY requests run at once; 429 / 503 are retried after the
// server's Retry-After.
"use strict";

const CONCURRENCY = 2;
const RETRIES = 5;
const results = []; // {name, score, card}
let running = 0;
const waiting = [];

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function explain(file) {
  const body = await file.arrayBuffer();
  for (let attempt = 0; ; attempt++) {
    const response = await fetch("/v1/explain", {
      method: "POST",
      // The server recognises the format from the bytes; a file the OS calls text/plain still gets there.
      headers: { "Content-Type": file.type.startsWith("image/") ? file.type : "application/octet-stream" },
      body,
    });
    if (response.ok) return response.json();
    let error = { code: "http_" + response.status, message: response.statusText };
    try {
      error = (await response.json()).error || error;
    } catch (_) { /* not our JSON error */ }
    if ((response.status === 429 || response.status === 503) && attempt < RETRIES) {
      const after = Number(response.headers.get("Retry-After")) || 2 ** attempt * 0.25;
      await sleep(after * 1000);
      continue;
    }
    throw error;
  }
}

function scaleLabel(scale) {
  return scale.longer_side ? `resized, longer side ${scale.longer_side}` : "native resolution";
}

function showResult(card, name, body) {
  const status = card.querySelector(".status");
  status.replaceChildren();
  const score = el("span", { class: "score", "data-score": String(body.score) }, body.score.toFixed(2));
  const meta = el("span", { class: "meta" }, `${body.model} v${body.model_version} · ${body.tokens} tokens`);
  status.append(score, meta);
  const scales = el("div", { class: "scales" });
  for (const scale of body.scales) {
    const figure = el("figure", { class: "heatmap", "data-scale": String(scale.scale_id) });
    const img = el("img", {
      src: "data:image/png;base64," + scale.heatmap_png,
      alt: `attention at scale ${scale.scale_id} (${scaleLabel(scale)})`,
    });
    const caption = el(
      "figcaption",
      {},
      `scale ${scale.scale_id}: ${scaleLabel(scale)}, ${scale.width}×${scale.height}, ` +
        `${scale.grid_w}×${scale.grid_h} patches, share ${(scale.share * 100).toFixed(1)} %`,
    );
    figure.append(img, caption);
    scales.append(figure);
  }
  card.append(scales);
  results.push({ name, score: body.score, card });
  renderRanking();
}

function renderRanking() {
  const list = document.getElementById("ranking");
  list.replaceChildren();
  for (const r of [...results].sort((a, b) => b.score - a.score)) {
    const item = el("li", { "data-name": r.name, "data-score": String(r.score) });
    item.append(el("span", { class: "r-score" }, r.score.toFixed(2)), document.createTextNode(r.name));
    list.append(item);
  }
  document.getElementById("ranking-section").hidden = results.length === 0;
}

async function run(file, card) {
  try {
    showResult(card, file.name, await explain(file));
  } catch (error) {
    const status = card.querySelector(".status");
    status.replaceChildren(el("span", { class: "error" }, `${error.code}: ${error.message}`));
    card.classList.add("failed");
  } finally {
    running--;
    if (waiting.length) start(...waiting.shift());
  }
}

function start(file, card) {
  running++;
  run(file, card);
}

function add(files) {
  const container = document.getElementById("results");
  document.getElementById("results-title").hidden = false;
  document.getElementById("hint").hidden = false;
  for (const file of files) {
    const card = el("article", { class: "card", "data-name": file.name });
    card.append(el("h3", {}, file.name), el("div", { class: "status" }, "scoring…"));
    container.append(card);
    if (running < CONCURRENCY) start(file, card);
    else waiting.push([file, card]);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("files");
  input.addEventListener("change", () => {
    add([...input.files]);
    input.value = "";
  });
  const drop = document.getElementById("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    add([...event.dataTransfer.files]);
  });
  fetch("/v1/models")
    .then((r) => r.json())
    .then((m) => {
      document.getElementById("model").textContent = "model: " + m.default;
    })
    .catch(() => {});
});

// featurebank page: no build step, no framework. Talks to /v1/info, /v1/classify, /v1/search
// and /v1/images/{id}/thumbnail. Thumbnails are fetched with fetch() (not <img src>) so that
// the API key header goes with them; nothing here ever sends a file path to the server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, key: sessionStorage.getItem("featurebank-key") || "", objectUrls: [] };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["X-API-Key"] = state.key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this service needs an API key");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadInfo() {
  try {
    const info = await (await api("/v1/info")).json();
    state.info = info;
    const parts = [`${info.model.backbone} · ${info.output.name} (${info.output.dim}-d) · decode ${info.decode_mode}`];
    parts.push(info.classifier ? `classifier: ${info.classifier.classes.length} classes` : "no classifier");
    parts.push(info.index ? `index: ${info.index.count} images` : "no index");
    $("model-info").textContent = parts.join(" · ");
    $("key-box").hidden = true;
  } catch (err) {
    $("model-info").textContent = err.message;
  }
}

function showPrediction(prediction) {
  if (!prediction) { $("prediction").hidden = true; return; }
  $("prediction").hidden = false;
  $("label").textContent = prediction.label;
  const list = $("probabilities");
  list.replaceChildren();
  for (const p of prediction.probabilities.slice(0, 5)) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = p.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * p.probability).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.textContent = `${(100 * p.probability).toFixed(1)}%`;
    li.append(name, bar, value);
    list.append(li);
  }
}

async function thumbnailUrl(url) {
  const blob = await (await api(url)).blob();
  const objectUrl = URL.createObjectURL(blob);
  state.objectUrls.push(objectUrl);
  return objectUrl;
}

function showResults(neighbours, metric) {
  for (const u of state.objectUrls) URL.revokeObjectURL(u);
  state.objectUrls = [];
  const grid = $("results");
  grid.replaceChildren();
  $("results-title").hidden = neighbours.length === 0;
  for (const n of neighbours) {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "result";
    card.dataset.id = n.id;
    card.title = n.path || n.name || n.id;
    const img = document.createElement("img");
    img.alt = n.name ? n.name.split("/").slice(-2).join("/") : n.id;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = metric === "cosine" ? `${n.score.toFixed(3)} cos` : `${n.score.toFixed(3)} L2²`;
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = n.name ? n.name.split("/").slice(-2).join("/") : n.id.slice(0, 12);
    card.append(img, score, name);
    card.addEventListener("click", () => searchFromId(n.id, img.src));
    grid.append(card);
    if (n.thumbnail_url) {
      thumbnailUrl(n.thumbnail_url).then((u) => { img.src = u; }).catch(() => { img.alt = "no thumbnail"; });
    }
  }
}

function showQuery(src) {
  $("preview").src = src;
  $("preview").hidden = false;
  $("drop-hint").textContent = "Drop or click for another image";
}

async function searchFromFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { setStatus(`${file.name} is not an image`, true); return; }
  showQuery(URL.createObjectURL(file));
  setStatus("embedding…");
  const t0 = performance.now();
  const body = { method: "POST", body: file, headers: { "Content-Type": file.type } };
  try {
    const info = state.info || {};
    // the second request finds the image in the service's embedding cache
    const prediction = info.classifier ? (await (await api("/v1/classify", body)).json()).predictions[0] : null;
    showPrediction(prediction);
    if (info.index) {
      const k = Math.min(info.limits.top_k, info.index.count);
      const found = await (await api(`/v1/search?k=${k}`, body)).json();
      showResults(found.results[0].neighbours, found.metric);
    }
    setStatus(`${file.name} · ${(performance.now() - t0).toFixed(0)} ms`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function searchFromId(id, src) {
  if (src) showQuery(src);
  setStatus("searching…");
  const t0 = performance.now();
  try {
    const info = state.info || {};
    const k = Math.min(info.limits.top_k, info.index.count);
    const requests = [api(`/v1/search?id=${encodeURIComponent(id)}&k=${k}`)];
    if (info.classifier) requests.push(api(`/v1/classify?id=${encodeURIComponent(id)}`));
    const [found, classified] = await Promise.all(requests);
    showPrediction(classified ? (await classified.json()).predictions[0] : null);
    const data = await found.json();
    showResults(data.results[0].neighbours, data.metric);
    setStatus(`indexed image ${id.slice(0, 12)}… · ${(performance.now() - t0).toFixed(0)} ms`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => searchFromFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => searchFromFile(e.dataTransfer.files[0]));
  $("key-save").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("featurebank-key", state.key);
    loadInfo().then(loadAudit);
  });
}

// with `featurebank serve --store DIR`: the suspects of `featurebank audit` (404 without a store)
async function loadAudit() {
  let data;
  try {
    const response = await fetch("/v1/audit", { headers: headers() });
    if (!response.ok) return;
    data = await response.json();
  } catch (err) { return; }
  const s = data.summary;
  const counts = Object.entries(s.counts).filter(([, n]) => n > 0).map(([k, n]) => `${n} ${k.replace(/_/g, " ")}`);
  $("audit-info").textContent = `${s.n_images} labelled images, ${s.classes.length} classes, out-of-fold accuracy ` +
    `${s.out_of_fold_accuracy.toFixed(3)}: ${counts.join(", ") || "nothing suspect"}`;
  const list = $("audit-list");
  list.replaceChildren();
  for (const r of data.suspects.slice(0, 60)) {
    const card = document.createElement("div");
    card.className = "result suspect";
    card.dataset.key = r.key;
    card.dataset.issue = r.issue;
    card.title = r.path || r.name;
    const img = document.createElement("img");
    img.alt = r.name;
    const what = document.createElement("div");
    what.className = "score";
    what.textContent = `#${r.rank} ${r.issue.replace(/_/g, " ")}`;
    const labels = document.createElement("div");
    labels.className = "labels";
    labels.textContent = `${r.given} → ${r.suggested}`;
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = r.name;
    card.append(img, what, labels, name);
    list.append(card);
    thumbnailUrl(r.thumbnail_url).then((u) => { img.src = u; }).catch(() => { img.alt = "no thumbnail"; });
  }
  $("audit").hidden = false;
}

wire();
loadInfo().then(loadAudit);

"use strict";
// The page talks to the service only through its public HTTP API. URLs are relative, so the page
// also works when a reverse proxy mounts the service under a path.

const state = {
  model: null,
  cards: [],                 // {file, element, ok}
  ends: { a: null, b: null },  // interpolation ends: {file, name, url}
  path: [],                  // base64 PNGs of the last interpolation
};
const MAX_PARALLEL_CARDS = 4;  // the server batches concurrent requests; more would only queue

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "vae-api-key";  // sessionStorage: the key leaves with the tab

// ---- talking to the API ----------------------------------------------------------------------

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) options = { ...options, headers: { ...(options.headers || {}), "X-API-Key": key } };
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error(`the service did not answer (${error.message})`);
  }
  if (response.status === 401) $("key-form").hidden = false;   // ask for a (new) key
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;  // not JSON: reported below with the raw text
  }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : text.slice(0, 300) || response.statusText;
    throw new Error(`${response.status} ${response.statusText || "error"}: ${detail}`);
  }
  if (body === null) throw new Error(`${path} did not answer with JSON`);
  return body;
}

function filesForm(files) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name || "image");
  return form;
}

function postJson(path, payload) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
}

const pngSource = (base64) => `data:image/png;base64,${base64}`;

// ---- small DOM helpers -----------------------------------------------------------------------

function el(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(node, message) {
  node.textContent = message;
  node.hidden = false;
}

function clearError(node) {
  node.textContent = "";
  node.hidden = true;
}

function figure(testid, caption) {
  const image = el("img", { className: "pixel", "data-testid": testid, alt: caption });
  return { image, node: el("figure", {}, [image, el("figcaption", { text: caption })]) };
}

function formatNumber(value) {
  if (value === 0) return "0";
  return Math.abs(value) < 0.001 ? value.toExponential(2) : value.toPrecision(3);
}

const percent = (fpr) => `${+(fpr * 100).toPrecision(3)}%`;

// ---- the model -------------------------------------------------------------------------------

async function loadModel() {
  try {
    const model = await api("model");
    state.model = model;
    const input = model.input;
    $("model-name").textContent = model.name;
    $("model-input").textContent = `${input.width}×${input.height}, ${input.channels === 1 ? "gray" : "RGB"}`;
    $("model-latent").textContent = String(model.latent_dim);
    $("model-score").textContent = `${model.score.kind} (${model.score.units || "nats per image"})`;
    fillFprChoices(model.calibration);
  } catch (error) {
    $("model-name").textContent = "unavailable";
    showError($("model-error"), `Cannot read the model: ${error.message}`);
  }
}

function useKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-form").hidden = true;
  clearError($("model-error"));
  loadModel();
}

function fillFprChoices(calibration) {
  // the rates the service reports thresholds for; any of them is valid for this calibration set
  const select = $("fpr");
  const rates = Object.keys(calibration.thresholds || {}).map(Number);
  if (!rates.includes(calibration.default_fpr)) rates.push(calibration.default_fpr);
  for (const rate of rates.sort((a, b) => a - b)) {
    const threshold = calibration.thresholds[String(rate)];
    const label = threshold === undefined ? percent(rate) : `${percent(rate)} (score > ${threshold.toFixed(2)})`;
    select.append(el("option", { value: String(rate), text: label }));
  }
  select.value = String(calibration.default_fpr);
}

// ---- scoring uploads -------------------------------------------------------------------------

function newCard(file) {
  const input = figure("input-image", "input");
  const heat = figure("heatmap", "heat map");
  const recon = figure("reconstruction", "reconstruction");
  const value = (testid) => el("dd", { "data-testid": testid, text: "…" });
  const parts = {
    input: input.image, heat: heat.image, recon: recon.image,
    verdict: el("span", { className: "verdict pending", "data-testid": "verdict", text: "scoring…" }),
    score: value("score"), pValue: value("p-value"), threshold: value("threshold"),
    error: el("p", { className: "error", "data-testid": "card-error", role: "alert", hidden: "" }),
    useA: el("button", { type: "button", "data-testid": "use-as-a", text: "use as A" }),
    useB: el("button", { type: "button", "data-testid": "use-as-b", text: "use as B" }),
  };
  const row = (name, node) => el("div", {}, [el("dt", { text: name }), node]);
  const element = el("article", { className: "card", "data-testid": "result-card" }, [
    el("header", {}, [el("span", { className: "name", text: file.name || "image", title: file.name || "" }),
      parts.verdict]),
    el("div", { className: "triple" }, [input.node, heat.node, recon.node]),
    el("dl", { className: "numbers" }, [row("score", parts.score), row("p-value", parts.pValue),
      row("threshold", parts.threshold)]),
    parts.error,
    el("div", { className: "card-actions" }, [parts.useA, parts.useB]),
  ]);
  const url = URL.createObjectURL(file);
  parts.input.src = url;
  // a file the browser cannot show may still be one the service reads (TIFF): say so, keep going
  parts.input.addEventListener("error", () => parts.input.classList.add("broken"), { once: true });
  parts.useA.addEventListener("click", () => setEnd("a", file, url));
  parts.useB.addEventListener("click", () => setEnd("b", file, url));
  return { file, url, element, parts, ok: false };
}

async function scoreCard(card) {
  const { parts } = card;
  const fpr = $("fpr").value;
  const query = `map=true&format=png${fpr ? `&fpr=${encodeURIComponent(fpr)}` : ""}`;
  const [scored, rebuilt] = await Promise.allSettled([
    api(`anomaly-score?${query}`, { method: "POST", body: filesForm([card.file]) }),
    card.ok ? Promise.resolve(null) : api("reconstruct?format=png", { method: "POST", body: filesForm([card.file]) }),
  ]);
  const failure = [scored, rebuilt].find((outcome) => outcome.status === "rejected");
  if (failure) {
    card.ok = false;
    card.element.classList.add("failed");
    parts.verdict.className = "verdict failed";
    parts.verdict.textContent = "error";
    for (const node of [parts.score, parts.pValue, parts.threshold]) node.textContent = "–";
    showError(parts.error, failure.reason.message);
    return;
  }
  showVerdict(card, scored.value);
  if (rebuilt.value) parts.recon.src = pngSource(rebuilt.value.images[0]);
  card.ok = true;
  card.element.classList.remove("failed");
  clearError(parts.error);
}

function showVerdict(card, answer) {
  const { parts } = card;
  const result = answer.results[0];
  parts.score.textContent = formatNumber(result.score);
  parts.pValue.textContent = formatNumber(result.p_value);
  parts.threshold.textContent = `${answer.threshold.toFixed(2)} at ${percent(answer.fpr)}`;
  parts.verdict.textContent = result.is_anomaly ? "anomalous" : "normal";
  parts.verdict.className = `verdict ${result.is_anomaly ? "anomalous" : "normal"}`;
  parts.heat.src = pngSource(result.map);
  card.element.dataset.verdict = result.is_anomaly ? "anomalous" : "normal";
}

async function runLimited(items, limit, task) {
  const queue = [...items];
  const worker = async () => {
    while (queue.length) await task(queue.shift());
  };
  await Promise.all(Array.from({ length: Math.min(limit, queue.length) }, worker));
}

function addFiles(fileList) {
  const files = [...fileList];
  if (!files.length) return;
  $("results-empty")?.remove();
  const cards = files.map(newCard);
  $("results").prepend(...cards.map((card) => card.element));  // newest batch first, in its own order
  state.cards.push(...cards);
  runLimited(cards, MAX_PARALLEL_CARDS, scoreCard).then(() => fillEmptyEnds(cards));
}

function rescoreAll() {
  runLimited(state.cards.filter((card) => card.ok), MAX_PARALLEL_CARDS, scoreCard);
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const input = $("file-input");
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";  // choosing the same file again should score it again
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  });
}

// ---- samples ---------------------------------------------------------------------------------

async function drawSamples(event) {
  event.preventDefault();
  const button = $("sample-button");
  const seedText = $("sample-seed").value.trim();
  // a seed is always sent, so any set the page shows can be drawn again
  const seed = seedText === "" ? Math.floor(Math.random() * 2 ** 31) : Number(seedText);
  const payload = { n: Number($("sample-n").value), temperature: Number($("sample-temperature").value), seed };
  button.disabled = true;
  clearError($("sample-error"));
  try {
    const answer = await postJson("sample?format=png", payload);
    const strip = $("samples");
    strip.replaceChildren(...answer.images.map((image, i) => el("img", {
      className: "pixel", "data-testid": "sample-image", src: pngSource(image),
      alt: `sample ${i + 1}`, title: `z = [${answer.z[i].map((v) => v.toFixed(2)).join(", ")}]`,
    })));
    strip.dataset.seed = String(seed);
    strip.append(el("p", { className: "caption", "data-testid": "sample-caption",
      text: `seed ${seed}, temperature ${payload.temperature}` }));
  } catch (error) {
    showError($("sample-error"), `Sampling failed: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---- interpolation ---------------------------------------------------------------------------

function setEnd(which, file, url) {
  state.ends[which] = { file, name: file.name || "image", url: url || URL.createObjectURL(file) };
  const preview = $(`interp-${which}-preview`);
  preview.classList.remove("broken");
  preview.addEventListener("error", () => preview.classList.add("broken"), { once: true });
  preview.src = state.ends[which].url;
  preview.hidden = false;
  $(`interp-${which}-name`).textContent = state.ends[which].name;
  $("interp-button").disabled = !(state.ends.a && state.ends.b);
}

function fillEmptyEnds(cards) {
  // the first two images that scored, in upload order, become the ends until the user picks others
  for (const card of cards.filter((c) => c.ok)) {
    const taken = [state.ends.a, state.ends.b].some((end) => end && end.file === card.file);
    if (taken) continue;
    if (!state.ends.a) setEnd("a", card.file, card.url);
    else if (!state.ends.b) setEnd("b", card.file, card.url);
  }
}

async function interpolate(event) {
  event.preventDefault();
  const button = $("interp-button");
  const steps = Number($("interp-steps").value);
  button.disabled = true;
  clearError($("interp-error"));
  try {
    const form = filesForm([state.ends.a.file, state.ends.b.file]);
    const answer = await api(`interpolate?steps=${steps}&format=png`, { method: "POST", body: form });
    showPath(answer.images);
  } catch (error) {
    showError($("interp-error"), `Interpolation failed: ${error.message}`);
  } finally {
    button.disabled = !(state.ends.a && state.ends.b);
  }
}

function showPath(images) {
  state.path = images;
  const slider = $("interp-slider");
  slider.max = String(images.length - 1);
  slider.value = "0";
  $("interp-strip").replaceChildren(...images.map((image, i) => {
    const thumb = el("img", { className: "pixel", src: pngSource(image), alt: `step ${i + 1}`,
      "data-testid": "interp-thumb" });
    thumb.addEventListener("click", () => {
      slider.value = String(i);
      showStep(i);
    });
    return thumb;
  }));
  $("interp-view").hidden = false;
  showStep(0);
}

function showStep(index) {
  const count = state.path.length;
  $("interp-image").src = pngSource(state.path[index]);
  const t = count > 1 ? index / (count - 1) : 0;
  $("interp-step-label").textContent = `step ${index + 1} of ${count} (t = ${t.toFixed(2)}: ${
    index === 0 ? "A" : index === count - 1 ? "B" : `${Math.round((1 - t) * 100)}% A, ${Math.round(t * 100)}% B`})`;
  $("interp-strip").querySelectorAll("img").forEach((thumb, i) => thumb.classList.toggle("current", i === index));
}

function setUpInterpolation() {
  for (const which of ["a", "b"]) {
    const input = $(`interp-file-${which}`);
    input.addEventListener("change", () => {
      if (input.files.length) setEnd(which, input.files[0]);
    });
  }
  $("interp-form").addEventListener("submit", interpolate);
  $("interp-slider").addEventListener("input", (event) => showStep(Number(event.target.value)));
}

// ---- start -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("results").append(el("p", { id: "results-empty", className: "empty", text: "No images scored yet." }));
  setUpDropZone();
  setUpInterpolation();
  $("sample-form").addEventListener("submit", drawSamples);
  $("fpr").addEventListener("change", rescoreAll);
  $("key-form").addEventListener("submit", useKey);
  loadModel();
});

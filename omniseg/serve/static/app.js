// The omniseg page: send an image to POST /v1/segment (or, for a Segment Anything model,
// POST /v1/mask-generation), draw the returned segments (COCO RLE masks) over it, and list
// them in a legend that highlights and toggles them.
"use strict";

const ALPHA = 0.5;            // segment colour over the image, as the server's overlay
const HIGHLIGHT_ALPHA = 0.8;  // the hovered segment
const DIMMED_ALPHA = 0.15;    // the others while one is hovered
// Shades for successive instances of one class: omniseg/viz/palette.py's steps.
const SHADE_STEPS = [0.0, 0.3, -0.3, 0.55, -0.5, 0.15, -0.15, 0.42, -0.4, 0.68, -0.62, 0.22, -0.22];

const $ = (id) => document.getElementById(id);
const state = {
  models: {},        // name -> {kind, tasks, labels, colors}
  file: null,        // the image being shown
  image: null,       // its decoded HTMLImageElement
  answer: null,      // the JSON document of the last answer
  owner: null,       // Int32Array: per pixel, the index of the segment drawn there, or -1
  colours: [],       // per segment [r, g, b]
  visible: [],       // per segment: drawn or hidden
  active: -1,        // the hovered segment, or -1
  params: null,      // the form fields of the last answer's request
  request: 0,        // segment requests made: only the latest one's answer is shown
  work: 0,           // busy() calls made: only the latest one ends the progress bar
};

// --- COCO RLE ------------------------------------------------------------------------------

// The counts of a compressed COCO RLE string (pycocotools' format): each count in 5-bit
// groups (6th bit: more follow), sign-extended, and from the third on a difference from
// the count two places earlier.
function rleCounts(text) {
  const counts = [];
  let position = 0;
  while (position < text.length) {
    let value = 0, shift = 0, more = true;
    while (more) {
      const c = text.charCodeAt(position++) - 48;
      value |= (c & 0x1f) << shift;
      more = (c & 0x20) !== 0;
      shift += 5;
      if (!more && (c & 0x10)) value |= -1 << shift;
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

// Marks the mask's pixels in owner (row-major, width x height) with index. RLE runs
// alternate background and mask, starting with background, down the columns.
function paintRle(segmentation, owner, width, index) {
  const height = segmentation.size[0];
  let offset = 0, area = 0;
  rleCounts(segmentation.counts).forEach((run, k) => {
    if (k % 2 === 1) {
      for (let i = offset; i < offset + run; i++) {
        const x = Math.floor(i / height), y = i - x * height;
        owner[y * width + x] = index;
      }
      area += run;
    }
    offset += run;
  });
  return area;
}

// --- colours -------------------------------------------------------------------------------

function shade(colour, instance) {
  const amount = SHADE_STEPS[instance % SHADE_STEPS.length];
  const target = amount > 0 ? 255 : 0;
  return colour.map((c) => Math.round(c + (target - c) * Math.abs(amount)));
}

function segmentColours(segments, classColours) {
  const seen = {};
  return segments.map((s) => {
    const instance = seen[s.label_id] || 0;
    seen[s.label_id] = instance + 1;
    return shade(classColours[String(s.label_id)] || [128, 128, 128], instance);
  });
}

// --- drawing -------------------------------------------------------------------------------

function draw() {
  const canvas = $("overlay");
  const { width, height } = canvas;
  const context = canvas.getContext("2d");
  context.fillStyle = "#808080";  // where the browser cannot show the image (TIFF, say)
  context.fillRect(0, 0, width, height);
  if (state.image) context.drawImage(state.image, 0, 0);
  const pixels = context.getImageData(0, 0, width, height);
  const data = pixels.data, owner = state.owner;
  for (let p = 0; p < owner.length; p++) {
    const s = owner[p];
    if (s < 0 || !state.visible[s]) continue;
    let alpha = ALPHA;
    if (state.active >= 0) alpha = s === state.active ? HIGHLIGHT_ALPHA : DIMMED_ALPHA;
    const x = p % width;
    // Outline: a pixel whose right or lower neighbour belongs to another segment (while one
    // segment is hovered, only its own outline).
    const edge = (state.active < 0 || s === state.active) &&
      ((x + 1 < width && owner[p + 1] !== s) || (p + width < owner.length && owner[p + width] !== s));
    const colour = state.colours[s];
    const q = 4 * p;
    for (let c = 0; c < 3; c++) {
      const tint = edge ? Math.round(colour[c] * 0.6) : colour[c];
      data[q + c] = edge ? tint : Math.round(data[q + c] * (1 - alpha) + tint * alpha);
    }
  }
  context.putImageData(pixels, 0, 0);
}

function showAnswer(answer) {
  state.answer = answer;
  const { width, height, segments } = answer;
  const canvas = $("overlay");
  canvas.width = width;
  canvas.height = height;
  state.owner = new Int32Array(width * height).fill(-1);
  // Lowest score first, so the most confident segment ends on top (as the server draws).
  const order = segments.map((_, i) => i).sort((a, b) => (segments[a].score ?? -Infinity) - (segments[b].score ?? -Infinity));
  const areas = new Array(segments.length).fill(0);
  order.forEach((i) => { areas[i] = paintRle(segments[i].segmentation, state.owner, width, i); });
  state.colours = segmentColours(segments, state.models[answer.model]?.colors || {});
  state.visible = segments.map(() => true);
  state.active = -1;
  fillLegend(segments, areas, width * height);
  $("summary").textContent = `${segments.length} ${answer.task} segment${segments.length === 1 ? "" : "s"}, ${answer.model}`;
  const json = new Blob([JSON.stringify(answer, null, 1)], { type: "application/json" });
  const link = $("download-json");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(json);
  link.download = stem(answer.image) + ".json";
  $("result").hidden = false;
  draw();
}

function fillLegend(segments, areas, total) {
  const body = $("legend").tBodies[0];
  body.replaceChildren();
  const semantic = segments.length > 0 && segments.every((s) => s.score === null);
  $("score-heading").textContent = semantic ? "" : "score";
  if (segments.length === 0) {
    const row = body.insertRow();
    row.className = "empty";
    const cell = row.insertCell();
    cell.colSpan = 5;
    cell.textContent = "no segments (try a lower threshold)";
    return;
  }
  segments.forEach((segment, i) => {
    const row = body.insertRow();
    row.dataset.index = String(i);
    row.dataset.segmentId = String(segment.id);
    row.dataset.area = String(areas[i]);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${state.colours[i].join(",")})`;
    row.insertCell().append(swatch);
    cell(row, "number", String(segment.id));
    cell(row, "label", segment.label);
    cell(row, "score", segment.score === null ? "" : segment.score.toFixed(2));
    cell(row, "area", `${(100 * areas[i] / total).toFixed(1)}%`);
    row.addEventListener("mouseenter", () => setActive(i));
    row.addEventListener("mouseleave", () => setActive(-1));
    row.addEventListener("click", () => {
      state.visible[i] = !state.visible[i];
      row.classList.toggle("off", !state.visible[i]);
      draw();
    });
  });
}

function cell(row, kind, text) {
  const td = row.insertCell();
  td.className = kind;
  td.textContent = text;
}

function setActive(index) {
  if (state.active === index) return;
  state.active = index;
  for (const row of $("legend").tBodies[0].rows) row.classList.toggle("active", row.dataset.index === String(index));
  draw();
}

// --- requests ------------------------------------------------------------------------------

async function loadModels() {
  try {
    const answer = await fetch("/v1/models").then(checked);
    const select = $("model");
    for (const model of answer.models) {
      state.models[model.name] = model;
      select.add(new Option(model.name, model.name, false, model.name === answer.default));
    }
    fillTasks();
  } catch (error) {
    showError(error);
  }
}

function fillTasks() {
  const model = state.models[$("model").value];
  // A Segment Anything model's score is its predicted IoU (the reference's pred_iou_thresh).
  $("threshold-name").textContent = model && model.kind === "mask-generation" ? "Min. IoU" : "Threshold";
  const select = $("task");
  const previous = select.value;
  select.replaceChildren(new Option("auto", "auto"));
  for (const task of model ? model.tasks : []) select.add(new Option(task, task));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

async function checked(response) {
  if (response.ok) {
    return (response.headers.get("content-type") || "").includes("json") ? response.json() : response.blob();
  }
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.message) message = `${response.status}: ${body.message}`;
  } catch (_) { /* not JSON: keep the status line */ }
  throw new Error(message);
}

// The route that serves the model: each one refuses the other kind's models.
function routeFor(params) {
  return state.models[params.model]?.kind === "mask-generation" ? "/v1/mask-generation" : "/v1/segment";
}

function formFor(params, format) {
  const form = new FormData();
  form.append("image", state.file, state.file.name || "pasted.png");
  for (const [name, value] of Object.entries(params)) form.append(name, value);
  form.append("format", format);
  return form;
}

async function busy(text, work) {
  // A new image may be dropped while a request runs: an earlier call's end must not hide
  // the progress bar (or show an error) of the one still running.
  const call = ++state.work;
  $("error").hidden = true;
  $("status-text").textContent = text;
  $("status").hidden = false;
  for (const id of ["run", "download-labels", "download-overlay"]) $(id).disabled = true;
  const started = performance.now();
  const timer = setInterval(() => {
    if (call === state.work) $("status-text").textContent = `${text} ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  try {
    await work();
  } catch (error) {
    if (call === state.work) showError(error);
  } finally {
    clearInterval(timer);
    if (call === state.work) {
      $("status").hidden = true;
      $("run").disabled = !state.file;
      $("download-labels").disabled = $("download-overlay").disabled = !state.answer;
    }
  }
}

async function segment() {
  if (!state.file) return;
  const params = { model: $("model").value, task: $("task").value, threshold: $("threshold").value };
  const request = ++state.request;
  await busy("Segmenting…", async () => {
    const answer = await fetch(routeFor(params), { method: "POST", body: formFor(params, "json") }).then(checked);
    // An answer for an image (or settings) replaced meanwhile would be drawn over the new one.
    if (request !== state.request) return;
    state.params = params;
    showAnswer(answer);
  });
}

async function download(format, suffix) {
  if (!state.answer) return;
  await busy("Preparing the download…", async () => {
    const blob = await fetch(routeFor(state.params), { method: "POST", body: formFor(state.params, format) }).then(checked);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = stem(state.answer.image) + suffix;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  });
}

function showError(error) {
  $("error").textContent = error instanceof Error ? error.message : String(error);
  $("error").hidden = false;
}

function stem(name) {
  const base = String(name || "image").split(/[\\/]/).pop();
  return base.includes(".") ? base.slice(0, base.lastIndexOf(".")) : base;
}

// --- input ---------------------------------------------------------------------------------

function useFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name}: not an image (${file.type})`);
    return;
  }
  state.file = file;
  state.answer = null;
  $("result").hidden = true;  // the last image's segments must not pass for this one's
  $("drop-text").textContent = `${file.name || "pasted image"} (${Math.ceil(file.size / 1024)} KB)`;
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => {
    state.image = image;
    $("original").src = url;
    segment();
  };
  image.onerror = () => {
    // The browser cannot show it (TIFF, say), but the server may read it: segments are
    // then drawn on grey, and an unreadable file gets the server's message.
    state.image = null;
    $("original").removeAttribute("src");
    segment();
  };
  image.src = url;
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => useFile(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("dragging"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    useFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) useFile(file);
  });
  $("threshold").addEventListener("input", () => {
    $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  });
  $("model").addEventListener("change", fillTasks);
  $("run").addEventListener("click", segment);
  $("download-labels").addEventListener("click", () => download("png", "_labels.png"));
  $("download-overlay").addEventListener("click", () => download("overlay", "_overlay.png"));
  $("overlay").addEventListener("mousemove", (event) => {
    if (!state.owner) return;
    const canvas = $("overlay"), box = canvas.getBoundingClientRect();
    const x = Math.floor((event.clientX - box.left) * canvas.width / box.width);
    const y = Math.floor((event.clientY - box.top) * canvas.height / box.height);
    const s = x >= 0 && y >= 0 && x < canvas.width && y < canvas.height ? state.owner[y * canvas.width + x] : -1;
    setActive(s >= 0 && state.visible[s] ? s : -1);
  });
  $("overlay").addEventListener("mouseleave", () => setActive(-1));
  loadModels();
}

setUp();

// The page: send the form to /v1/dedupe/stream, fill one progress bar per stage as events
// arrive, then show every chunk (kept or dropped, and why) and the map.
import { buildBody, curlCommand } from "./request.js";
import { sseEvents } from "./stream.js";

const SVG = "http://www.w3.org/2000/svg";
// Okabe-Ito colours (told apart with colour-blindness), then darker variants.
const PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#8c510a", "#5e3c99", "#01665e", "#b2182b"];
const MAX_MAP_LABELS = 40;

const $ = (id) => document.getElementById(id);
const streamUrl = () => new URL("v1/dedupe/stream", document.baseURI).href;
let lastRequest = null;

function element(tag, attributes = {}, text = "") {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function showError(message) {
  $("error").textContent = message;
}

async function run(event) {
  event.preventDefault();
  showError("");
  let body;
  try {
    body = buildBody($("chunks").value, $("threshold").value);
  } catch (error) {
    showError(error.message);
    return;
  }
  const apiKey = $("api-key").value.trim();
  lastRequest = { url: streamUrl(), body, apiKey };
  $("copy-curl").disabled = false;
  $("result").hidden = true;
  $("stages").replaceChildren();
  $("stages-section").hidden = false;
  setBusy(true);
  try {
    await stream(body, apiKey);
  } catch (error) {
    showError(`Could not reach the server: ${error.message}`);
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  $("run").disabled = busy;
  $("request").setAttribute("aria-busy", String(busy));
}

async function stream(body, apiKey) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const response = await fetch(lastRequest.url, { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.ok) {
    showError(`${response.status} ${response.statusText}: ${await errorMessage(response)}`);
    return;
  }
  const stats = {};
  for await (const { type, data } of sseEvents(response)) {
    if (type === "progress") {
      progress(data);
      if (data.stats) stats[data.stage] = data.stats;
    } else if (type === "complete") {
      render(body, data, stats);
      return;
    } else if (type === "error") {
      showError(`The ${data.stage || "request"} stage failed: ${data.error}`);
      return;
    }
  }
  showError("The stream ended before the result arrived.");
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error;
  } catch {
    return text.slice(0, 200) || "no message";
  }
}

function progress({ stage, progress: fraction, stats }) {
  let bar = $(`stage-${stage}`);
  if (!bar) {
    const row = element("div", { class: "stage" });
    row.append(element("label", { for: `stage-${stage}` }, stage));
    bar = element("progress", { id: `stage-${stage}`, max: "1", value: "0" });
    row.append(bar, element("span", { class: "stage-stats", id: `stage-${stage}-stats` }));
    $("stages").append(row);
  }
  bar.value = fraction;
  if (stats) $(`stage-${stage}-stats`).textContent = describeStats(stats);
}

function describeStats(stats) {
  return Object.entries(stats)
    .map(([name, value]) => (name === "duration_ms" ? `${value} ms` : `${name.replaceAll("_", " ")}: ${statText(value)}`))
    .join(" · ");
}

/** A stat as a person reads it: a count per name ({"numbers": 1, "coverage": 0}) as
 * "numbers 1" (zero counts left out), a list joined, never a raw object or "undefined". */
function statText(value) {
  if (value === null || value === undefined) return "none";
  if (Array.isArray(value)) return value.length ? value.map(statText).join(", ") : "none";
  if (typeof value === "object") {
    const counts = Object.entries(value).filter(([, count]) => count !== 0);
    return counts.length ? counts.map(([name, count]) => `${name.replaceAll("_", " ")} ${statText(count)}`).join(", ") : "none";
  }
  return String(value);
}

const plural = (count, one, many) => `${count} ${count === 1 ? one : many}`;

const nameOf = (row) => (row.id !== "" ? row.id : `#${row.index + 1}`);

function render(body, result, stageStats) {
  const explain = result.explain;
  const rows = explain.chunks;
  const { stats } = result;
  const guarded = guardStories(explain.guarded_pairs, rows);
  const threshold = stageStats.clustering ? `, threshold ${stageStats.clustering.threshold}` : "";
  $("summary").textContent =
    `${plural(stats.input_count, "chunk", "chunks")} in, ${stats.output_count} kept (${stats.reduction_pct}% fewer) ` +
    `in ${plural(stats.cluster_count, "cluster", "clusters")}${threshold}; ` +
    `${plural(explain.guarded_pairs.length, "pair", "pairs")} held apart by a guard; ` +
    `${stats.latency_ms} ms.`;
  $("chunk-list").replaceChildren(...rows.map((row) => chunkItem(row, body.chunks[row.index], rows, guarded)));
  drawMap(explain.map, rows);
  $("result").hidden = false;
}

/** Per input index: sentences saying which guard held it apart from which chunk. */
function guardStories(pairs, rows) {
  const stories = new Map();
  const add = (index, other, guard) => {
    if (!stories.has(index)) stories.set(index, []);
    stories.get(index).push(`The ${guard} guard held it apart from chunk ${nameOf(rows[other])}` +
      (guard === "numbers" ? ": each states a number the other lacks." : "."));
  };
  for (const { a, b, guard } of pairs) {
    add(a, b, guard);
    add(b, a, guard);
  }
  return stories;
}

function chunkItem(row, chunk, rows, guarded) {
  const dropped = row.state === "duplicate" || row.state === "mmr";
  const item = element("li", {
    "data-chunk-id": row.id, "data-state": dropped ? "dropped" : "kept", "data-cluster": String(row.cluster_id),
  });
  const swatch = element("span", { class: "swatch", "aria-hidden": "true" });
  swatch.style.backgroundColor = colour(row.cluster_id);
  const head = element("div", { class: "chunk-head" });
  head.append(swatch, element("strong", {}, `Chunk ${nameOf(row)}`),
    element("span", { class: `badge ${dropped ? "dropped" : "kept"}` }, dropped ? "dropped" : "kept"),
    element("span", { class: "cluster" }, row.cluster_id >= 0 ? `cluster ${row.cluster_id}` : "frozen prefix"));
  const text = chunk && chunk.text ? chunk.text : "(embedding only)";
  item.append(head, element("p", { class: "chunk-text" }, text));
  const why = [reason(row, rows), ...(guarded.get(row.index) || [])].filter(Boolean);
  for (const sentence of why) item.append(element("p", { class: "why" }, sentence));
  return item;
}

function reason(row, rows) {
  if (row.state === "duplicate") {
    const kept = rows[row.kept_index];
    const after = kept.state === "mmr" ? ", which MMR then left out" : "";
    return `Merged into chunk ${nameOf(kept)} at cosine distance ${row.distance}${after}.`;
  }
  if (row.state === "mmr") return "Its cluster's best chunk, left out by MMR (target_k) for diversity.";
  if (row.state === "frozen") return "Part of the frozen cache prefix: returned as sent.";
  return "";
}

const colour = (cluster) => (cluster < 0 ? "#595959" : PALETTE[cluster % PALETTE.length]);

function drawMap(points, rows) {
  const svg = $("map");
  svg.replaceChildren(svg.querySelector("title"));
  const placed = []; // label positions so far: near-duplicates' labels stack instead of overlapping
  // Dropped chunks first, so the kept ones' rings are drawn on top.
  const order = rows.map((row) => row.index).sort((i, j) => isKept(rows[i]) - isKept(rows[j]) || i - j);
  for (const index of order) {
    const row = rows[index];
    if (points[index] === null) continue; // a frozen prefix chunk: never embedded, not on the map
    const [x, y] = points[index];
    const kept = isKept(row);
    const circle = element("svg:circle", {
      cx: String(x), cy: String(-y), r: kept ? "0.05" : "0.035",
      fill: colour(row.cluster_id), class: kept ? "kept" : "dropped", "data-chunk-id": row.id,
    });
    circle.append(element("svg:title", {}, `Chunk ${nameOf(row)}: ${kept ? "kept" : "dropped"}, cluster ${row.cluster_id}`));
    svg.append(circle);
    if (rows.length <= MAX_MAP_LABELS) {
      let labelY = -y + 0.03;
      while (placed.some(([px, py]) => Math.abs(px - x) < 0.15 && Math.abs(py - labelY) < 0.08)) labelY += 0.085;
      placed.push([x, labelY]);
      svg.append(element("svg:text", { x: String(x + 0.065), y: String(labelY), class: "label", "aria-hidden": "true" }, nameOf(row)));
    }
  }
}

const isKept = (row) => row.state === "kept" || row.state === "frozen";

async function copyCurl() {
  if (!lastRequest) return;
  const command = curlCommand(lastRequest.url, lastRequest.body, lastRequest.apiKey);
  $("curl").textContent = command;
  $("curl-section").hidden = false;
  try {
    await navigator.clipboard.writeText(command);
    $("copied").textContent = "Copied to the clipboard.";
  } catch {
    $("copied").textContent = "Shown below: select it and copy.";
  }
}

$("request").addEventListener("submit", run);
$("copy-curl").addEventListener("click", copyCurl);
$("chunks").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("request").requestSubmit();
});

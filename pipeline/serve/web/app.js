// The search page: upload (drop, pick or paste) a photo, show its look-alikes; click one for more like it.
// Plain JS, no build step, nothing loaded from the network but this server's /api.
"use strict";

const $ = (id) => document.getElementById(id);
const baseName = (path) => path.split(/[\\/]/).pop();

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(url, options) {
  const response = await fetch(url, options);
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("key").focus();
  }
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return { body, version: response.headers.get("X-Index-Version") };
}

async function showIndex() {
  try {
    const s = (await api("/api/stats")).body;
    $("index-info").textContent =
      `index ${s.version} · ${s.count.toLocaleString()} images · model ${s.model.name}`;
  } catch (err) {
    $("index-info").textContent = `index unavailable: ${err.message}`;
  }
}

function showQuery(src, title, note) {
  $("query").hidden = false;
  $("query-img").src = src;
  $("query-img").alt = title;
  $("query-title").textContent = title;
  $("query-note").textContent = note;
}

function card(hit, version) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.title = `${hit.path}\nclick: more like this`;
  const name = baseName(hit.path);
  button.setAttribute("aria-label", `#${hit.rank} ${name}, score ${hit.score.toFixed(3)}: more like this`);
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = "";
  img.loading = "lazy";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  const meta = document.createElement("span");
  meta.className = "meta";
  const nameEl = document.createElement("span");
  nameEl.className = "name";
  nameEl.textContent = name;
  const score = document.createElement("span");
  score.className = "score";
  const meter = document.createElement("span");
  meter.className = "meter";
  const fill = document.createElement("i");
  fill.style.width = `${Math.max(0, Math.min(1, hit.score)) * 100}%`;
  meter.append(fill);
  score.append(hit.score.toFixed(3), meter);
  meta.append(nameEl, score);
  button.append(img, rank, meta);
  button.addEventListener("click", () => moreLike(hit, version));
  li.append(button);
  return li;
}

function render(result, version, started) {
  const grid = $("results");
  grid.replaceChildren(...result.results.map((hit) => card(hit, version)));
  if (!result.results.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "No results.";
    grid.append(li);
  }
  const ms = Math.round(performance.now() - started);
  setStatus(`${result.results.length} results in ${ms} ms (index ${version})`);
  $("query-title").focus({ preventScroll: true });
}

async function run(title, note, src, url, options) {
  const started = performance.now();
  showQuery(src, title, note);
  setStatus("Searching…");
  try {
    const { body, version } = await api(url, options);
    render(body[0], version, started);
  } catch (err) {
    $("results").replaceChildren();
    setStatus(err.message, true);
  }
}

function searchFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name || "pasted image");
  const k = $("k").value;
  run(`Results for ${file.name || "the pasted image"}`, "your photo", URL.createObjectURL(file),
      `/api/search?k=${k}`, { method: "POST", body: form });
}

function moreLike(hit, version) {
  const k = $("k").value;
  const q = new URLSearchParams({ like: hit.id, version, k, exclude_self: "true" });
  run(`More like ${baseName(hit.path)}`, hit.path, hit.thumbnail, `/api/search?${q}`);
}

function setUp() {
  const drop = $("drop");
  $("pick").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  // Dropping anywhere works; the zone lights up while a file is over the page.
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; drop.classList.add("over"); });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) drop.classList.remove("over"); });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    drop.classList.remove("over");
    searchFile([...e.dataTransfer.files].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) searchFile(item.getAsFile());
  });
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    // The server checks the key and answers with an HttpOnly session cookie: no script ever holds it.
    const response = await fetch("/api/session", { method: "POST", headers: { "X-API-Key": $("key").value } });
    $("key").value = "";
    if (!response.ok) {
      setStatus("Wrong key.", true);
      return;
    }
    $("key-form").hidden = true;
    setStatus("Key accepted for this browser session; search again.");
    showIndex();
  });
  showIndex();
  setInterval(showIndex, 15000);  // a nightly rebuild shows up here
}

setUp();

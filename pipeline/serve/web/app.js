// The search page: upload (drop, pick or paste) a photo, show its look-alikes; click one for more like it.
// On a writable service (--writable), once the key is given: add the photo to the collection, remove a result.
// Plain JS, no build step, nothing loaded from the network but this server's /api.
"use strict";

const $ = (id) => document.getElementById(id);
const baseName = (path) => path.split(/[\\/]/).pop();

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// Writes (add, remove) are offered only where health says the service is writable and the key has been
// accepted: a writable service always wants a key, so a keyed call that answers means this browser has it.
let writable = false;    // GET /api/health's "writable"
let authorised = false;  // the last keyed call answered (not 401)
let queryFile = null;    // the photo the results are for (null for "more like" an indexed image)

function showWriteControls() {
  const can = writable && authorised;
  document.body.classList.toggle("can-write", can);
  $("add-form").hidden = !(can && queryFile);
}

async function api(url, options) {
  const response = await fetch(url, options);
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("key").focus();
    authorised = false;
    showWriteControls();
  }
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return { body, version: response.headers.get("X-Index-Version") };
}

// The filter box: conditions separated by ";" (a ";" inside quotes stays), each sent as one where=.
function whereParams() {
  const out = [];
  let current = "", quote = null;
  for (const ch of $("where").value) {
    if (quote) { if (ch === quote) quote = null; current += ch; }
    else if (ch === '"' || ch === "'") { quote = ch; current += ch; }
    else if (ch === ";") { out.push(current); current = ""; }
    else current += ch;
  }
  out.push(current);
  return out.map((c) => c.trim()).filter((c) => c);
}

function withWhere(params) {
  for (const w of whereParams()) params.append("where", w);
  if ($("verify").checked) params.set("verify", "true");
  return params;
}

async function showFields() {
  try {
    const { fields } = (await api("/api/fields")).body;
    const names = Object.keys(fields);
    $("where-keys").replaceChildren(...names.map((n) => {
      const o = document.createElement("option");
      o.value = `${n}${fields[n] === "string" ? "=" : fields[n] === "date" ? ">=" : "<"}`;
      return o;
    }));
    $("fields").textContent = "fields: " + names.map((n) => `${n} (${fields[n] === "string" ? "text" : fields[n]})`).join(", ");
  } catch (err) {
    $("fields").textContent = "";
  }
}

function metadataText(metadata) {
  const builtin = new Set(["size", "mtime", "width", "height"]);
  const own = Object.entries(metadata || {}).filter(([k]) => !builtin.has(k));
  const shown = own.length ? own : Object.entries(metadata || {}).filter(([k]) => k === "width" || k === "height");
  return shown.map(([k, v]) => `${k}=${v}`).join(" · ");
}

let lastSearch = null;  // re-run when the filter changes

async function showIndex() {
  try {
    const s = (await api("/api/stats")).body;
    $("index-info").textContent =
      `index ${s.version} · ${s.count.toLocaleString()} images · model ${s.model.name}`;
    authorised = true;
  } catch (err) {
    $("index-info").textContent = `index unavailable: ${err.message}`;
  }
  showWriteControls();
}

async function checkWritable() {
  // Health needs no key; while the service is starting it answers 503 without "writable": ask again shortly.
  try {
    const health = await (await fetch("/api/health")).json();
    if (health.status === "starting") {
      setTimeout(checkWritable, 1000);
      return;
    }
    writable = health.writable === true;
  } catch (err) {
    writable = false;
  }
  document.body.dataset.writable = writable ? "yes" : "no";
  showWriteControls();
}

// An in-page confirmation (a modal <dialog>, Cancel focused first): resolves true for the action, false otherwise.
function confirmAction(message, verb) {
  const dialog = $("confirm");
  $("confirm-text").textContent = message;
  $("confirm-yes").textContent = verb;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

async function addToCollection() {
  const file = queryFile;
  if (!file) return;
  const name = file.name || "the pasted image";
  const meta = $("add-meta").value.trim();
  const ok = await confirmAction(
    `Add ${name} to the collection${meta ? " with this metadata" : ""}? Searches find it from now on.`, "Add");
  if (!ok) return;
  const form = new FormData();
  form.append("image", file, file.name || "pasted image");
  if (meta) form.append("metadata", meta);
  $("add").disabled = true;
  setStatus(`Adding ${name}…`);
  try {
    const { body } = await api("/api/images", { method: "POST", body: form });
    setStatus(body.duplicate_of == null
      ? `Added as id ${body.id}`
      : `Already in the collection as id ${body.duplicate_of}`);
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    $("add").disabled = false;
  }
}

async function removeHit(hit, version, li, button) {
  const name = baseName(hit.path);
  const ok = await confirmAction(
    `Remove ${hit.path} (id ${hit.id})? Searches never return it again. ` +
    "A photo added here is deleted; a file in your own folders is only hidden, never deleted.", "Remove");
  if (!ok) return;
  button.disabled = true;
  try {
    const query = version ? `?${new URLSearchParams({ version })}` : "";
    await api(`/api/images/${hit.id}${query}`, { method: "DELETE" });
    li.remove();
    if (!$("results").children.length) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = "No results.";
      $("results").append(empty);
    }
    setStatus(`Removed ${name} (id ${hit.id})`);
  } catch (err) {
    button.disabled = false;
    setStatus(err.message, true);
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
  const details = metadataText(hit.metadata);
  button.title = `${hit.path}\nid ${hit.id}${details ? "\n" + details : ""}\nclick: more like this`;
  const name = baseName(hit.path);
  button.setAttribute("aria-label", `#${hit.rank} ${name}, score ${hit.score.toFixed(3)}: more like this`);
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = "";
  img.loading = "lazy";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  if (hit.verified) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "verified copy";
    badge.title = `${hit.inliers} matched points fit one transform`;
    rank.append(" ", badge);
  }
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
  if (details) {
    const fields = document.createElement("span");
    fields.className = "fields";
    fields.textContent = details;
    button.append(fields);
  }
  button.addEventListener("click", () => moreLike(hit, version));
  li.dataset.id = hit.id;
  li.append(button);
  // Beside the card, not in it (no button inside a button); shown by CSS only while writes are allowed.
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "remove";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove ${name} from the collection`);
  remove.addEventListener("click", () => removeHit(hit, version, li, remove));
  li.append(remove);
  return li;
}

function render(result, version, started) {
  const grid = $("results");
  grid.replaceChildren(...result.results.map((hit) => card(hit, version)));
  if (!result.results.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = whereParams().length ? "No results among the images the filter selects." : "No results.";
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
  const src = URL.createObjectURL(file);
  queryFile = file;
  showWriteControls();
  lastSearch = () => {
    const form = new FormData();
    form.append("image", file, file.name || "pasted image");
    const q = withWhere(new URLSearchParams({ k: $("k").value }));
    run(`Results for ${file.name || "the pasted image"}`, "your photo", src, `/api/search?${q}`,
        { method: "POST", body: form });
  };
  lastSearch();
}

function moreLike(hit, version) {
  queryFile = null;
  showWriteControls();
  lastSearch = () => {
    const q = withWhere(new URLSearchParams({ like: hit.id, version, k: $("k").value, exclude_self: "true" }));
    run(`More like ${baseName(hit.path)}`, hit.path, hit.thumbnail, `/api/search?${q}`);
  };
  lastSearch();
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
  $("verify").addEventListener("change", () => { if (lastSearch) lastSearch(); });
  $("filter-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (lastSearch) lastSearch();
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
    authorised = true;
    setStatus("Key accepted for this browser session; search again.");
    showIndex();
    showFields();
  });
  $("add-form").addEventListener("submit", (e) => {
    e.preventDefault();
    addToCollection();
  });
  showIndex();
  showFields();
  checkWritable();
  setInterval(showIndex, 15000);  // a nightly rebuild shows up here
}

setUp();

// cytoretrieve viewer: plain JS over the JSON endpoints (no build step). State: the table and the last query.
"use strict";
const $ = (id) => document.getElementById(id);
// query: {id} or {file}; seq numbers each search so a slow, older answer never overwrites a newer one
// offset: the first stored row shown; kind: what the table's rows are (cells, tiles, fields), for the page's words
const state = { table: null, facets: null, query: null, seq: 0, offset: 0, kind: "cells", large: null };
const PAGE = 60;
const WORDS = { cells: ["cell", "cells"], tiles: ["tile", "tiles"], fields: ["field", "fields"] };

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function api(url, options) {
  const r = await fetch(url, options);
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${detail}`);
  }
  return r;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function filters() {
  const f = {};
  for (const name of ["label", "binary", "dataset", "slide"]) {
    const v = $("filter-" + name).value;
    if (v !== "") f[name] = v;
  }
  return f;
}

function fillSelect(select, values, render) {
  select.length = 1;  // keep "any"
  for (const { value, count } of values) select.add(new Option(`${render ? render(value) : value} (${count})`, value));
}

async function loadTables() {
  const tables = await (await api("/api/tables")).json();
  const select = $("table");
  select.length = 0;
  for (const t of tables) select.add(new Option(`${t.name} (${t.rows} rows, ${t.arch}, ${t.dim}-d)`, t.name));
  if (!tables.length) { status("This store holds no vector table: embed something first.", true); return; }
  await chooseTable(tables[0].name);
}

function resetQuery() {
  // nothing of the previous table's query may stay on screen: its picture, name, counts, hits, large view
  state.query = null;
  state.large = null;
  $("query-picture").hidden = true;
  $("query-picture").removeAttribute("src");
  $("query-name").textContent = "";
  $("file").value = "";
  $("counts").innerHTML = "";
  $("results").innerHTML = "";
  $("overviews").innerHTML = "";
  $("summary").hidden = true;
  $("compare").hidden = true;
  if (window.slideView) window.slideView.close();
}

function setWords(kind) {
  state.kind = WORDS[kind] ? kind : "cells";
  const [one, many] = WORDS[state.kind];
  for (const el of document.querySelectorAll(".kind-one")) el.textContent = one;
  for (const el of document.querySelectorAll(".kind-many")) el.textContent = many;
}

async function chooseTable(name) {
  state.table = name;
  state.seq += 1;
  state.offset = 0;
  resetQuery();
  $("table").value = name;
  $("browse").innerHTML = "";  // the previous table's cells must not be clicked while this one's load
  const f = await (await api(`/api/tables/${encodeURIComponent(name)}/facets`)).json();
  if (state.table !== name) return;  // another table was chosen while this one's facets loaded
  state.facets = f;
  setWords(f.kind);
  $("table-info").textContent = `${f.rows} rows${f.tiles ? ", tiles on " + f.slide.length + " slide(s)" : ""}`;
  fillSelect($("filter-label"), f.label);
  fillSelect($("filter-dataset"), f.dataset);
  fillSelect($("filter-slide"), f.slide);
  $("export-geojson").disabled = !f.tiles;
  $("export-geojson").title = f.tiles ? "" : "cells have no slide position: QuPath objects need tiles";
  const [one] = WORDS[state.kind];
  status(`Drop a ${one} image or click a stored ${one}; click a hit to see it large.`);
  document.dispatchEvent(new CustomEvent("viewer:table", { detail: { table: name, facets: f } }));  // labels.js
  await loadBrowse();
}

async function loadBrowse() {
  const table = state.table;
  const offset = state.offset;
  const params = new URLSearchParams({ ...filters(), limit: String(PAGE), offset: String(offset) });
  const page = await (await api(`/api/tables/${encodeURIComponent(table)}/rows?${params}`)).json();
  if (table !== state.table || offset !== state.offset) return;  // another table or page was chosen meanwhile
  const last = offset + page.rows.length;
  $("browse-total").textContent = page.total ? `(${offset + 1}–${last} of ${page.total})` : "(none)";
  $("page-prev").disabled = offset === 0;
  $("page-next").disabled = last >= page.total;
  $("browse").innerHTML = page.rows.map((r) =>
    `<img class="cell" loading="lazy" src="${esc(r.thumbnail)}" data-id="${esc(r.id)}" title="${esc(r.label ?? "")} ${esc(r.id)}" alt="${esc(r.id)}">`).join("");
}

function request(format) {
  const base = `/api/tables/${encodeURIComponent(state.table)}/search`;
  const params = { ...filters(), k: $("k").value || "12", format };
  if (state.query.id !== undefined) return [`${base}?${new URLSearchParams({ ...params, id: state.query.id })}`, undefined];
  const body = new FormData();
  for (const [key, value] of Object.entries(params)) body.append(key, value);
  body.append("image", state.query.file);
  return [base, { method: "POST", body }];
}

async function runSearch() {
  if (!state.query) return;
  const seq = ++state.seq;
  status("searching…");
  try {
    const [url, options] = request("json");
    const result = await (await api(url, options)).json();
    if (seq !== state.seq) return;  // a newer search (or table) has been asked for meanwhile
    render(result);
    status(`${result.hits.length} nearest to ${result.query}${result.where ? " where " + result.where : ""}`);
  } catch (e) {
    if (seq === state.seq) status(e.message, true);
  }
}

function counts(result) {
  const parts = Object.entries(result.label_counts).map(([label, n]) => `<b>${esc(label)}</b> ${n}`);
  let vote = "";
  if (result.majority_label && result.is_tie) {
    vote = ` — no majority: <b>${result.tied.map(esc).join(", ")}</b> tied`;
  } else if (result.majority_label) {
    vote = ` — majority <b>${esc(result.majority_label)}</b>`;
  }
  return `neighbours' labels: ${parts.join(" · ") || "none"}${vote}`;
}

function card(h) {
  const where = h.slide !== null ? `${esc(h.slide)} @ ${h.x}, ${h.y}` : esc(h.dataset ?? "");
  const pct = h.percentile === null || h.percentile === undefined ? "" :
    ` <span class="muted" title="percentile among this table's nearest-neighbour similarities (50 = as close as typical neighbours)">pct ${h.percentile.toFixed(0)}</span>`;
  return `<div class="hit" data-id="${esc(h.id)}" title="click: see it large beside the query">
    <img src="${esc(h.thumbnail)}" alt="${esc(h.id)}">
    <div>#${h.rank} similarity <b class="score">${h.score.toFixed(3)}</b>${pct}</div>
    <div><b class="label">${esc(h.label ?? "(no label)")}</b> <span class="pill ${h.binary_name}">${h.binary_name}</span></div>
    <div class="muted where">${where}</div><div class="id">${esc(h.id)}</div></div>`;
}

function mark(o, place, cls, text) {
  return `<div class="${cls}" style="left:${100 * place.x / o.width}%;top:${100 * place.y / o.height}%;` +
    `width:${100 * place.side / o.width}%;height:${100 * place.side / o.height}%"><span>${text}</span></div>`;
}

function overview(slide, o, hits, query) {
  let marks = hits.filter((h) => h.slide === slide && h.side).map((h) => mark(o, h, "mark", h.rank)).join("");
  const here = query && query.slide === slide && query.side;
  if (here) marks += mark(o, query, "mark query", "query");
  const legend = here ? "hits marked by rank, the query in blue" : "hits marked by rank";
  return `<div class="overview"><div><b>${esc(slide)}</b> <span class="muted">${legend}</span></div>
    <div class="frame"><img src="${esc(o.url)}" alt="overview of ${esc(slide)}">${marks}</div></div>`;
}

function render(result) {
  state.lastHits = result.hits;
  state.lastResult = result;
  $("summary").hidden = false;
  $("counts").innerHTML = counts(result);
  $("results").innerHTML = result.hits.map(card).join("");
  $("overviews").innerHTML = Object.entries(result.overviews).map(([s, o]) => overview(s, o, result.hits, result.query_place)).join("");
}

function openLarge(id) {
  // a stored row large (a cell's source image, a tile read at full resolution) beside the query
  const hit = (state.lastHits || []).find((h) => h.id === id);
  state.large = id;
  $("large-picture").src = `/api/tables/${encodeURIComponent(state.table)}/picture?${new URLSearchParams({ id })}`;
  const where = hit && hit.slide !== null ? ` — ${hit.slide} @ ${hit.x}, ${hit.y}` : "";
  $("large-caption").textContent = hit ? `#${hit.rank} ${hit.label ?? "(no label)"} (${hit.binary_name}), similarity ${hit.score.toFixed(3)}${where} — ${id}` : id;
  const picture = $("query-picture");
  const byId = state.query && state.query.id !== undefined;  // a stored query: its large picture too
  $("compare-query").src = byId ? `/api/tables/${encodeURIComponent(state.table)}/picture?${new URLSearchParams({ id: state.query.id })}`
    : (picture.hidden ? "" : picture.src);
  $("compare-query-name").textContent = $("query-name").textContent;
  $("compare").hidden = false;
  document.dispatchEvent(new CustomEvent("viewer:large", { detail: { id } }));  // labels.js: its history
  // a tile or cell on a slide: its slide at full resolution, centred on it (the query's slide beside it)
  if (hit && hit.slide !== null && window.slideView) window.slideView.open(hit, state.lastResult);
}

function queryById(id) {
  state.query = { id };
  $("compare").hidden = true;
  const picture = $("query-picture");
  picture.src = `/api/tables/${encodeURIComponent(state.table)}/thumbnail?${new URLSearchParams({ id })}`;
  picture.hidden = false;
  $("query-name").textContent = id;
  runSearch();
}

function queryByFile(file) {
  if (!file) return;
  state.query = { file };
  $("compare").hidden = true;
  const picture = $("query-picture");
  picture.src = URL.createObjectURL(file);
  picture.hidden = false;
  $("query-name").textContent = file.name;
  runSearch();
}

async function exportHits(format) {
  if (!state.query) { status("search first, then export its hits", true); return; }
  try {
    const [url, options] = request(format);
    const blob = await (await api(url, options)).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${state.table}_hits.${format}`;
    document.body.appendChild(a);
    a.click();
    a.remove();
  } catch (e) {
    status(e.message, true);
  }
}

function wire() {
  $("table").addEventListener("change", (e) => chooseTable(e.target.value).catch((err) => status(err.message, true)));
  $("file").addEventListener("change", (e) => queryByFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); queryByFile(e.dataTransfer.files[0]); });
  for (const id of ["filter-label", "filter-binary", "filter-dataset", "filter-slide"]) {
    $(id).addEventListener("change", () => { state.offset = 0; loadBrowse().catch((err) => status(err.message, true)); runSearch(); });
  }
  $("k").addEventListener("change", runSearch);
  $("results").addEventListener("click", (e) => { const hit = e.target.closest(".hit"); if (hit) openLarge(hit.dataset.id); });
  $("large-search").addEventListener("click", () => { if (state.large) { $("compare").hidden = true; queryById(state.large); } });
  $("large-close").addEventListener("click", () => { $("compare").hidden = true; state.large = null; });
  const page = (step) => { state.offset = Math.max(0, state.offset + step * PAGE); loadBrowse().catch((err) => status(err.message, true)); };
  $("page-prev").addEventListener("click", () => page(-1));
  $("page-next").addEventListener("click", () => page(1));
  $("browse").addEventListener("click", (e) => { const cell = e.target.closest(".cell"); if (cell) queryById(cell.dataset.id); });
  $("export-csv").addEventListener("click", () => exportHits("csv"));
  $("export-geojson").addEventListener("click", () => exportHits("geojson"));
  loadTables().catch((err) => status(err.message, true));
}

window.viewer = { state, api, esc, status };  // what labels.js reads (the table, the page's fetch and escaping)
document.addEventListener("DOMContentLoaded", wire);

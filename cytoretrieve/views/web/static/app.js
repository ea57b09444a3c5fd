// cytoretrieve viewer: plain JS over the JSON endpoints (no build step). State: the table and the last query.
"use strict";
const $ = (id) => document.getElementById(id);
// query: {id} or {file}; seq numbers each search so a slow, older answer never overwrites a newer one
const state = { table: null, facets: null, query: null, seq: 0 };

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

async function chooseTable(name) {
  state.table = name;
  state.query = null;
  state.seq += 1;
  $("table").value = name;
  $("results").innerHTML = "";
  $("overviews").innerHTML = "";
  $("browse").innerHTML = "";  // the previous table's cells must not be clicked while this one's load
  $("summary").hidden = true;
  const f = await (await api(`/api/tables/${encodeURIComponent(name)}/facets`)).json();
  if (state.table !== name) return;  // another table was chosen while this one's facets loaded
  state.facets = f;
  $("table-info").textContent = `${f.rows} rows${f.tiles ? ", tiles on " + f.slide.length + " slide(s)" : ""}`;
  fillSelect($("filter-label"), f.label);
  fillSelect($("filter-dataset"), f.dataset);
  fillSelect($("filter-slide"), f.slide);
  $("export-geojson").disabled = !f.tiles;
  $("export-geojson").title = f.tiles ? "" : "cells have no slide position: QuPath objects need tiles";
  status("Drop a cell image or click a stored cell.");
  await loadBrowse();
}

async function loadBrowse() {
  const table = state.table;
  const params = new URLSearchParams({ ...filters(), limit: "60" });
  const page = await (await api(`/api/tables/${encodeURIComponent(table)}/rows?${params}`)).json();
  if (table !== state.table) return;  // another table was chosen meanwhile
  $("browse-total").textContent = `(${page.rows.length} of ${page.total})`;
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
  const majority = result.majority_label ? ` — majority <b>${esc(result.majority_label)}</b>` : "";
  return `neighbours' labels: ${parts.join(" · ") || "none"}${majority}`;
}

function card(h) {
  const where = h.slide !== null ? `${esc(h.slide)} @ ${h.x}, ${h.y}` : esc(h.dataset ?? "");
  return `<div class="hit" data-id="${esc(h.id)}" title="click: search by this cell">
    <img src="${esc(h.thumbnail)}" alt="${esc(h.id)}">
    <div>#${h.rank} similarity <b class="score">${h.score.toFixed(3)}</b></div>
    <div><b class="label">${esc(h.label ?? "(no label)")}</b> <span class="pill ${h.binary_name}">${h.binary_name}</span></div>
    <div class="muted">${where}</div><div class="id">${esc(h.id)}</div></div>`;
}

function overview(slide, o, hits) {
  const marks = hits.filter((h) => h.slide === slide && h.side).map((h) =>
    `<div class="mark" style="left:${100 * h.x / o.width}%;top:${100 * h.y / o.height}%;` +
    `width:${100 * h.side / o.width}%;height:${100 * h.side / o.height}%"><span>${h.rank}</span></div>`).join("");
  return `<div class="overview"><div><b>${esc(slide)}</b> <span class="muted">hits marked by rank</span></div>
    <div class="frame"><img src="${esc(o.url)}" alt="overview of ${esc(slide)}">${marks}</div></div>`;
}

function render(result) {
  $("summary").hidden = false;
  $("counts").innerHTML = counts(result);
  $("results").innerHTML = result.hits.map(card).join("");
  $("overviews").innerHTML = Object.entries(result.overviews).map(([s, o]) => overview(s, o, result.hits)).join("");
}

function queryById(id) {
  state.query = { id };
  const picture = $("query-picture");
  picture.src = `/api/tables/${encodeURIComponent(state.table)}/thumbnail?${new URLSearchParams({ id })}`;
  picture.hidden = false;
  $("query-name").textContent = id;
  runSearch();
}

function queryByFile(file) {
  if (!file) return;
  state.query = { file };
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
    $(id).addEventListener("change", () => { loadBrowse().catch((err) => status(err.message, true)); runSearch(); });
  }
  $("k").addEventListener("change", runSearch);
  $("results").addEventListener("click", (e) => { const hit = e.target.closest(".hit"); if (hit) queryById(hit.dataset.id); });
  $("browse").addEventListener("click", (e) => { const cell = e.target.closest(".cell"); if (cell) queryById(cell.dataset.id); });
  $("export-csv").addEventListener("click", () => exportHits("csv"));
  $("export-geojson").addEventListener("click", () => exportHits("geojson"));
  loadTables().catch((err) => status(err.message, true));
}

document.addEventListener("DOMContentLoaded", wire);

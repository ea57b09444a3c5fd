// cytoretrieve viewer: expert labels (issue "expert labels that feed back"). Plain JS over the label routes.
// The reviewer's name is asked once and kept in localStorage. A key labels the selection when there is one, else the
// picture pointed at (a hit, a stored row, a queue item, a map point): 1-9 the table's classes in order, 0 "unsure".
// Shift-click toggles a picture in the selection; dragging on the map lassoes points into it (shift: adds). One
// action = one POST of every row; undo (button, u, Ctrl-Z) gives the last action's rows back the reviews they had
// before it, in one POST (the action's events named, so undoing again walks further back). Badges show
// each reviewed row's review (red where it disagrees with the stored label); "next to review" lists the rows the
// k-NN vote is least sure of, "disagreements" the reviews that differ from the stored label; h shows a row's history.
"use strict";
(() => {
  const NAME_KEY = "cytoretrieve.reviewer";
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"];
  const PAD = 12;
  const $ = (id) => document.getElementById(id);
  const V = () => window.viewer;
  const esc = (s) => V().esc(s);
  const L = {
    table: null, classes: [], unsure: "unsure", readOnly: false,
    reviews: new Map(),  // id -> current review row of the labels route (label, stored_label, disagrees, ...)
    selection: new Set(), current: null, undo: [],  // undo: [{table, ids, events}], the last action last
    map: null, lasso: null, list: null,  // list: the review list shown ("queue" or "disagree") and its ids
  };

  const base = () => `/api/tables/${encodeURIComponent(L.table)}`;
  const reviewer = () => localStorage.getItem(NAME_KEY) || "";
  const thumb = (id) => `${base()}/thumbnail?${new URLSearchParams({ id })}`;
  const colour = (label) => label === null || label === undefined ? "#c8c8c8"
    : label === L.unsure ? "#555" : PALETTE[Math.max(0, L.classes.indexOf(label)) % PALETTE.length];

  function say(text, isError) {
    $("label-status").textContent = text;
    $("label-status").className = isError ? "error" : "muted";
  }

  async function json(url, body) {
    const options = body === undefined ? undefined
      : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    return (await V().api(url, options)).json();
  }

  // ------------------------------------------------------------------------------------------ the reviewer

  function showReviewer() {
    const name = reviewer();
    $("reviewer-ask").hidden = Boolean(name);
    $("reviewer-show").hidden = !name;
    $("reviewer-name").textContent = name;
  }

  function saveReviewer() {
    const name = $("reviewer-input").value.trim();
    if (!name) { say("type your name first: every label records who gave it", true); return; }
    localStorage.setItem(NAME_KEY, name);
    showReviewer();
    say(`labels will be recorded as ${name}`);
  }

  // ------------------------------------------------------------------------------------------ the table's labels

  function legend() {
    const keys = L.classes.map((c, i) => [i < 9 ? String(i + 1) : "", c]);
    keys.push(["0", L.unsure]);
    $("label-keys").innerHTML = keys.map(([key, c]) =>
      `<button type="button" class="label-key" data-label="${esc(c)}" title="label ${esc(c)}${key ? " (key " + key + ")" : ""}">` +
      `<span class="swatch" style="background:${colour(c)}"></span>${key ? `<kbd>${key}</kbd> ` : ""}${esc(c)}</button>`).join("");
    const queue = $("queue-class");
    queue.length = 1;
    for (const c of L.classes) queue.add(new Option(c, c));
    $("map-legend").innerHTML = [...L.classes, L.unsure].map((c) =>
      `<span><span class="swatch" style="background:${colour(c)}"></span>${esc(c)}</span>`).join(" ") +
      ` <span><span class="swatch" style="background:${colour(null)}"></span>no label</span>` +
      ' <span><span class="swatch ring"></span>selected</span>';
  }

  async function loadReviews() {
    const table = L.table;
    const answer = await json(`${base()}/labels`);
    if (table !== L.table) return;
    L.classes = answer.classes;
    L.unsure = answer.unsure;
    L.readOnly = answer.read_only;
    L.reviews = new Map(answer.reviews.map((r) => [r.id, r]));
    const c = answer.counts;
    const disagree = answer.reviews.filter((r) => r.disagrees).length;
    $("label-counts").textContent = `${c.reviewed_rows} reviewed row(s), ${disagree} disagree with the stored label, ` +
      `${c.events} event(s) in the log${L.readOnly ? " — read-only server: labelling is off" : ""}`;
    legend();
    decorate();
    if (L.map) { for (const [i, id] of L.map.ids.entries()) L.map.review[i] = L.reviews.get(id)?.label ?? null; drawMap(); }
  }

  async function chooseTable(table) {
    L.table = table;
    L.selection.clear();
    L.current = null;
    L.map = null;
    L.list = null;
    $("review-list").hidden = true;
    $("history-id").textContent = "";
    $("history-body").textContent = "point at a picture or click a map point, then press h (or open a hit large)";
    showTarget();
    try {
      await loadReviews();
      await loadMap();
    } catch (e) { say(e.message, true); }
  }

  // ------------------------------------------------------------------------------------------ badges, selection

  function badge(id) {
    const r = L.reviews.get(id);
    if (!r) return "";
    const text = r.disagrees ? `${r.stored_label ?? "?"} → ${r.label}` : r.label;
    return `<span class="review-badge${r.disagrees ? " disagrees" : ""}" title="reviewed by ${esc(r.reviewer)}: ${esc(r.label)}` +
      ` (stored: ${esc(r.stored_label ?? "none")})">${esc(text)}</span>`;
  }

  function decorate() {
    // every picture of a row on the page: reviewed / disagrees / selected marks, a badge where there is room
    for (const node of document.querySelectorAll("#results .hit[data-id], #browse .cell[data-id], #review-items .review-item[data-id]")) {
      const id = node.dataset.id;
      const r = L.reviews.get(id);
      node.classList.toggle("reviewed", Boolean(r));
      node.classList.toggle("disagrees", Boolean(r && r.disagrees));
      node.classList.toggle("selected", L.selection.has(id));
      if (node.tagName === "IMG") {  // a stored row in the browse grid: no room for a badge, its outline and title
        node.title = r ? `${id} — reviewed ${r.label}${r.disagrees ? " (stored " + (r.stored_label ?? "none") + ")" : ""}` : id;
        continue;
      }
      const old = node.querySelector(":scope > .review-badge");
      if (old) old.remove();
      if (r) node.insertAdjacentHTML("afterbegin", badge(id));
    }
    showTarget();
  }

  function toggle(id) {
    if (L.selection.has(id)) L.selection.delete(id); else L.selection.add(id);
    decorate();
    drawMap();
  }

  function clearSelection() {
    L.selection.clear();
    decorate();
    drawMap();
  }

  function showTarget() {
    const n = L.selection.size;
    $("label-target").textContent = n ? `the ${n} selected row(s)` : L.current ? L.current : "nothing yet: point at a picture";
    $("label-target").className = n || L.current ? "" : "muted";
  }

  function setCurrent(id) {
    L.current = id;
    showTarget();
  }

  // ------------------------------------------------------------------------------------------ labelling, undo

  async function label(value) {
    if (!L.table) return;
    if (L.readOnly) { say("this server is read-only: labels cannot be recorded", true); return; }
    if (!reviewer()) { say("type your name first (every label records who gave it)", true); $("reviewer-input").focus(); return; }
    const bulk = L.selection.size > 0;
    const ids = bulk ? [...L.selection] : L.current ? [L.current] : [];
    if (!ids.length) { say("point at a picture, shift-click some or lasso them on the map first", true); return; }
    try {
      const answer = await json(`${base()}/labels`, { reviewer: reviewer(), labels: ids.map((id) => ({ id, label: value })) });
      L.undo.push({ table: L.table, ids: answer.events.map((ev) => ev.row_id), events: answer.events.map((ev) => ev.event) });
      $("label-undo").disabled = false;
      say(`${answer.events.length} row(s) labelled ${value}`);
      if (bulk) L.selection.clear();
      await loadReviews();
      if (ids.length === 1) await showHistory(ids[0]);
      if (!bulk) advance(ids[0]);
    } catch (e) { say(e.message, true); }
  }

  function advance(id) {
    // in the queue, the next row not reviewed yet becomes the one a key labels
    if (!L.list || L.list.kind !== "queue") return;
    const at = L.list.ids.indexOf(id);
    if (at < 0) return;
    const next = L.list.ids.slice(at + 1).find((r) => !L.reviews.has(r));
    if (next) setCurrent(next);
  }

  async function undo() {
    const last = L.undo[L.undo.length - 1];
    if (!last) { say("nothing to undo", true); return; }
    if (!reviewer()) { say("type your name first", true); return; }
    try {
      const answer = await json(`/api/tables/${encodeURIComponent(last.table)}/labels/undo`, { ids: last.ids, events: last.events, reviewer: reviewer() });
      L.undo.pop();
      $("label-undo").disabled = L.undo.length === 0;
      say(`undone: ${answer.events.length} row(s) back to their previous review`);
      if (last.table === L.table) {
        await loadReviews();
        if (last.ids.length === 1) await showHistory(last.ids[0]);
      }
    } catch (e) { say(e.message, true); }
  }

  // ------------------------------------------------------------------------------------------ history

  async function showHistory(id) {
    if (!id || !L.table) return;
    const table = L.table;
    setCurrent(id);
    const answer = await json(`${base()}/labels/history?${new URLSearchParams({ id })}`);
    if (table !== L.table) return;
    $("history-id").textContent = id;
    const r = L.reviews.get(id);
    const stored = r ? r.stored_label : null;
    if (!answer.events.length) { $("history-body").innerHTML = "no review yet"; return; }
    $("history-body").innerHTML = (stored !== null ? `<div>stored label <b>${esc(stored)}</b></div>` : "") +
      `<table class="history"><thead><tr><th>when (UTC)</th><th>what</th><th>label</th><th>who</th><th>source</th></tr></thead><tbody>` +
      answer.events.map((e) => `<tr><td>${esc(e.time.slice(0, 19).replace("T", " "))}</td><td>${esc(e.action)}</td>` +
        `<td><b>${esc(e.label ?? "(none)")}</b>${e.note ? ` <span class="muted">${esc(e.note)}</span>` : ""}</td>` +
        `<td>${esc(e.reviewer ?? "")}</td><td>${esc(e.source)}</td></tr>`).join("") + "</tbody></table>";
  }

  // ------------------------------------------------------------------------------------------ queue, disagreements

  function item(id, caption) {
    return `<div class="review-item" data-id="${esc(id)}"><img src="${esc(thumb(id))}" alt="${esc(id)}" loading="lazy">` +
      `<div>${caption}</div><div class="id">${esc(id)}</div></div>`;
  }

  async function openQueue() {
    if (!L.table) return;
    const klass = $("queue-class").value;
    const params = new URLSearchParams({ n: "30", ...(klass ? { class: klass } : {}) });
    try {
      const s = await json(`${base()}/labels/suggest?${params}`);
      L.list = { kind: "queue", ids: s.rows.map((r) => r.id) };
      $("review-list-title").textContent = `Next to review${klass ? " in " + klass : ""}`;
      $("review-list-note").textContent = `${s.rows.length} of ${s.candidates} unreviewed row(s), least sure ${s.k}-NN vote first`;
      $("review-items").innerHTML = s.rows.map((r) => item(r.id,
        `vote <b>${esc(r.predicted)}</b> <span class="muted">margin ${r.margin.toFixed(2)}</span><br>` +
        `<span class="muted">stored ${esc(r.stored_label ?? "none")}</span>`)).join("");
      $("review-list").hidden = false;
      if (L.list.ids.length) setCurrent(L.list.ids[0]);
      decorate();
    } catch (e) { say(e.message, true); }
  }

  async function openDisagreements() {
    if (!L.table) return;
    try {
      const answer = await json(`${base()}/labels?disagree=true`);
      L.list = { kind: "disagree", ids: answer.reviews.map((r) => r.id) };
      $("review-list-title").textContent = "Disagreements";
      $("review-list-note").textContent = `${answer.reviews.length} review(s) differ from the stored label, latest first`;
      $("review-items").innerHTML = answer.reviews.map((r) => item(r.id,
        `stored <b>${esc(r.stored_label)}</b> → <b>${esc(r.label)}</b><br><span class="muted">${esc(r.reviewer ?? "")}</span>`)).join("")
        || '<p class="muted">none: every review agrees with the stored label</p>';
      $("review-list").hidden = false;
      decorate();
    } catch (e) { say(e.message, true); }
  }

  // ------------------------------------------------------------------------------------------ the map and its lasso

  async function loadMap() {
    const table = L.table;
    const method = $("map-method").value;
    $("map-note").textContent = "computing the map…";
    const m = await json(`${base()}/map?${new URLSearchParams({ method })}`);
    if (table !== L.table || method !== $("map-method").value) return;
    L.map = m;
    $("map-note").textContent = `${m.method}: ${m.note}`;
    drawMap();
  }

  function place(i) {
    const c = $("map-canvas");
    return [PAD + L.map.x[i] * (c.width - 2 * PAD), c.height - PAD - L.map.y[i] * (c.height - 2 * PAD)];
  }

  function drawMap() {
    const c = $("map-canvas");
    const g = c.getContext("2d");
    g.clearRect(0, 0, c.width, c.height);
    if (!L.map) return;
    const r = L.map.ids.length > 5000 ? 1.5 : 3;
    const selected = [];
    for (let i = 0; i < L.map.ids.length; i++) {
      const [x, y] = place(i);
      g.fillStyle = colour(L.map.review[i] ?? L.map.label[i]);
      g.beginPath();
      g.arc(x, y, r, 0, 2 * Math.PI);
      g.fill();
      if (L.selection.has(L.map.ids[i])) selected.push([x, y]);
    }
    g.strokeStyle = "#000";
    g.lineWidth = 1.5;
    for (const [x, y] of selected) { g.beginPath(); g.arc(x, y, r + 2.5, 0, 2 * Math.PI); g.stroke(); }
    if (L.lasso && L.lasso.length > 1) {
      g.strokeStyle = "#1f77b4";
      g.setLineDash([4, 3]);
      g.beginPath();
      g.moveTo(...L.lasso[0]);
      for (const p of L.lasso.slice(1)) g.lineTo(...p);
      g.stroke();
      g.setLineDash([]);
    }
  }

  function canvasPoint(e) {
    const c = $("map-canvas");
    const box = c.getBoundingClientRect();
    return [(e.clientX - box.left) * c.width / box.width, (e.clientY - box.top) * c.height / box.height];
  }

  function inside([x, y], polygon) {
    // even-odd rule: a ray to the right crosses the polygon's edges an odd number of times
    let odd = false;
    for (let i = 0, j = polygon.length - 1; i < polygon.length; j = i++) {
      const [xi, yi] = polygon[i];
      const [xj, yj] = polygon[j];
      if ((yi > y) !== (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi) odd = !odd;
    }
    return odd;
  }

  function nearest([x, y]) {
    let best = -1;
    let dist = 64;  // within 8 canvas px
    for (let i = 0; i < L.map.ids.length; i++) {
      const [px, py] = place(i);
      const d = (px - x) ** 2 + (py - y) ** 2;
      if (d < dist) { dist = d; best = i; }
    }
    return best;
  }

  function wireMap() {
    const c = $("map-canvas");
    c.addEventListener("pointerdown", (e) => {
      if (!L.map) return;
      c.setPointerCapture(e.pointerId);
      L.lasso = [canvasPoint(e)];
      L.lassoAdds = e.shiftKey;
    });
    c.addEventListener("pointermove", (e) => {
      if (!L.lasso) return;
      L.lasso.push(canvasPoint(e));
      drawMap();
    });
    c.addEventListener("pointerup", (e) => {
      if (!L.lasso) return;
      const polygon = L.lasso;
      L.lasso = null;
      const [x0, y0] = polygon[0];
      const far = polygon.some(([x, y]) => Math.abs(x - x0) + Math.abs(y - y0) > 6);
      if (!far) {  // a click: the nearest point becomes the current row (shift: toggles it in the selection)
        const i = nearest(canvasPoint(e));
        if (i >= 0) {
          if (e.shiftKey) toggle(L.map.ids[i]);
          showHistory(L.map.ids[i]).catch((err) => say(err.message, true));
        }
        drawMap();
        return;
      }
      if (!L.lassoAdds) L.selection.clear();
      let n = 0;
      for (let i = 0; i < L.map.ids.length; i++) if (inside(place(i), polygon)) { L.selection.add(L.map.ids[i]); n += 1; }
      say(`lasso: ${n} point(s) added, ${L.selection.size} selected; press a key to label them`);
      decorate();
      drawMap();
    });
    $("map-method").addEventListener("change", () => loadMap().catch((err) => say(err.message, true)));
  }

  // ------------------------------------------------------------------------------------------ wiring

  function keydown(e) {
    if (e.defaultPrevented || e.altKey) return;
    const t = e.target;
    if (t.closest && (t.closest("input, select, textarea, [contenteditable]") || t.closest("#slide-view"))) return;
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") { e.preventDefault(); undo(); return; }
    if (e.ctrlKey || e.metaKey) return;
    if (e.key === "u") { e.preventDefault(); undo(); return; }
    if (e.key === "Escape") { clearSelection(); return; }
    if (e.key === "h" && L.current) { showHistory(L.current).catch((err) => say(err.message, true)); return; }
    if (e.key === "0") { e.preventDefault(); label(L.unsure); return; }
    if (/^[1-9]$/.test(e.key)) {
      const c = L.classes[Number(e.key) - 1];
      if (c !== undefined) { e.preventDefault(); label(c); }
    }
  }

  const PICTURES = "#results .hit[data-id], #browse .cell[data-id], #review-items .review-item[data-id]";

  function wire() {
    showReviewer();
    $("reviewer-save").addEventListener("click", saveReviewer);
    $("reviewer-input").addEventListener("keydown", (e) => { if (e.key === "Enter") saveReviewer(); });
    $("reviewer-change").addEventListener("click", () => {
      $("reviewer-input").value = reviewer();
      $("reviewer-ask").hidden = false;
      $("reviewer-show").hidden = true;
      $("reviewer-input").focus();
    });
    $("label-keys").addEventListener("click", (e) => { const b = e.target.closest(".label-key"); if (b) label(b.dataset.label); });
    $("label-undo").addEventListener("click", undo);
    $("select-clear").addEventListener("click", clearSelection);
    $("queue-open").addEventListener("click", openQueue);
    $("disagree-open").addEventListener("click", openDisagreements);
    $("review-list-close").addEventListener("click", () => { $("review-list").hidden = true; L.list = null; });
    $("review-items").addEventListener("click", (e) => {
      const node = e.target.closest(".review-item");
      if (node) showHistory(node.dataset.id).catch((err) => say(err.message, true));
    });
    // shift-click toggles a picture in the selection, before the page's own click (search, open large) sees it
    document.addEventListener("click", (e) => {
      const node = e.shiftKey && e.target.closest && e.target.closest(PICTURES);
      if (!node) return;
      e.preventDefault();
      e.stopPropagation();
      toggle(node.dataset.id);
    }, true);
    document.addEventListener("mouseover", (e) => {
      const node = e.target.closest && e.target.closest(PICTURES);
      if (node && node.dataset.id !== L.current) setCurrent(node.dataset.id);
    });
    document.addEventListener("keydown", keydown);
    document.addEventListener("viewer:table", (e) => chooseTable(e.detail.table));
    document.addEventListener("viewer:large", (e) => showHistory(e.detail.id).catch((err) => say(err.message, true)));
    const observer = new MutationObserver(decorate);  // the page re-renders hits and stored rows: badge them again
    for (const id of ["results", "browse"]) observer.observe($(id), { childList: true });
    wireMap();
  }

  document.addEventListener("DOMContentLoaded", wire);
})();

// cytoretrieve viewer: slides at full resolution (OpenSeadragon, vendored in /static/vendor/openseadragon).
// A hit on a slide opens its slide centred on it, outlined (cells: the nucleus marked); a stored query on a slide
// opens beside it. Over each slide, on a canvas: the tiles `tile` kept, the cells `cells` found, this search's hits,
// with an opacity slider; a scale bar from the slide's mpp; keyboard zoom (+ - 0 and arrows, OpenSeadragon's keys).
// Also: a measuring tool (drag a line: its length in um from the slide's mpp, px without one; Esc clears), the tile
// scores of a saved `score --save-scores` run as a heat map (turbo colours on the run's shared scale, with a legend),
// and "similar slides": the nearest slides of the chosen table, one opened beside the current one on click.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const COLOURS = { tiles: "#00b4d8", cells: "#2ca02c", hits: "#ffbf00", focus: "#ff2d55", query: "#1f77b4" };
  const panes = {};
  const view = { sync: false, syncing: false, hits: [], query: null, measuring: false, run: "" };
  window.cytoSlides = { panes, view };  // for the browser test: viewports and overlay counts

  async function getJSON(url) {
    const r = await fetch(url);
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
      throw new Error(`${r.status}: ${detail}`);
    }
    return r.json();
  }

  function showError(text) {
    $("slide-error").textContent = text ? String(text).split(/\s+/).join(" ") : "";  // one line
    $("slide-error").hidden = !text;
  }

  function makePane(name) {
    const el = $("osd-" + name);
    const viewer = OpenSeadragon({
      element: el, showNavigationControl: false, showNavigator: true, navigatorPosition: "BOTTOM_RIGHT",
      navigatorSizeRatio: 0.18, animationTime: 0.4, maxZoomPixelRatio: 4, visibilityRatio: 0.3,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true }, crossOriginPolicy: false,
      preserveImageSizeOnResize: true, imageLoaderLimit: 8,
      drawer: "canvas",  // the 2-D canvas drawer: WebGL falls back to a slow software renderer on machines without a GPU
    });
    const canvas = document.createElement("canvas");
    canvas.className = "slide-overlay";
    viewer.canvas.appendChild(canvas);
    const bar = document.createElement("div");
    bar.className = "scalebar";
    bar.innerHTML = "<div class='scalebar-line'></div><span></span>";
    viewer.canvas.appendChild(bar);
    const pane = { name, viewer, canvas, bar, info: null, overlays: null, focus: null, anchor: null, token: 0,
                   drawn: { tiles: 0, cells: 0, hits: 0, scores: 0 }, tilesLoaded: 0, tilesFailed: 0,
                   scores: null, measure: null };
    viewer.addHandler("update-viewport", () => { draw(pane); scaleBar(pane); });
    viewer.addHandler("viewport-change", () => syncFrom(pane));
    viewer.addHandler("tile-loaded", () => { pane.tilesLoaded += 1; });
    viewer.addHandler("tile-load-failed", (e) => { pane.tilesFailed += 1; showError(`a tile of ${pane.info ? pane.info.slide : "the slide"} did not load (${e.message || "error"})`); });
    viewer.addHandler("open-failed", (e) => showError(`the slide did not open: ${e.message || "error"}`));
    const at = (e) => viewer.viewport.viewerElementToImageCoordinates(e.position);
    viewer.addHandler("canvas-press", (e) => {  // measuring: a press starts a line (in slide px, so it pans along)
      if (!view.measuring || !pane.info) return;
      pane.measure = { a: at(e), b: at(e) };
      showLength(pane);
      draw(pane);
    });
    viewer.addHandler("canvas-drag", (e) => {
      if (!view.measuring || !pane.measure) return;
      e.preventDefaultAction = true;  // no panning while measuring
      pane.measure.b = at(e);
      showLength(pane);
      draw(pane);
    });
    for (const event of ["canvas-drag-end", "canvas-click"]) viewer.addHandler(event, (e) => { if (view.measuring) e.preventDefaultAction = true; });
    panes[name] = pane;
    return pane;
  }

  function pane(name) { return panes[name] || makePane(name); }

  function imageRect(p, x, y, w, h) {
    const vp = p.viewer.viewport;
    const a = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    const b = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(x + w, y + h));
    return [a.x, a.y, b.x - a.x, b.y - a.y];
  }

  function draw(p) {
    const c = p.canvas;
    const w = p.viewer.canvas.clientWidth, h = p.viewer.canvas.clientHeight, r = window.devicePixelRatio || 1;
    if (c.width !== Math.round(w * r) || c.height !== Math.round(h * r)) { c.width = Math.round(w * r); c.height = Math.round(h * r); }
    const g = c.getContext("2d");
    g.setTransform(r, 0, 0, r, 0, 0);
    g.clearRect(0, 0, w, h);
    p.drawn = { tiles: 0, cells: 0, hits: 0, scores: 0 };
    if (!p.info || !p.viewer.world.getItemCount()) { c.dataset.drawn = JSON.stringify(p.drawn); return; }
    const alpha = Number($("overlay-opacity").value) / 100;
    const visible = (x, y, s) => x + s > 0 && y + s > 0 && x < w && y < h;
    if (p.scores && p.scores.run === view.run) {  // the heat map: each scored tile filled by its score
      g.globalAlpha = alpha;
      const span = (p.scores.hi - p.scores.lo) || 1;
      for (const [x, y, s, score] of p.scores.tiles) {
        const [sx, sy, sw, sh] = imageRect(p, x, y, s, s);
        if (!visible(sx, sy, Math.max(sw, sh)) || score === null) continue;
        g.fillStyle = turbo((score - p.scores.lo) / span);
        g.fillRect(sx, sy, sw, sh);
        p.drawn.scores += 1;
      }
    }
    g.lineWidth = 1.5;
    if (p.overlays && $("layer-tiles").checked) {
      g.globalAlpha = alpha;
      g.strokeStyle = COLOURS.tiles;
      for (const layer of p.overlays.tiles) {
        for (const [x, y, s] of layer.tiles) {
          const [sx, sy, sw, sh] = imageRect(p, x, y, s, s);
          if (visible(sx, sy, Math.max(sw, sh))) { g.strokeRect(sx, sy, sw, sh); p.drawn.tiles += 1; }
        }
      }
    }
    if (p.overlays && $("layer-cells").checked) {
      g.globalAlpha = alpha;
      g.fillStyle = COLOURS.cells;
      for (const layer of p.overlays.cells) {
        for (const [nx, ny] of layer.cells) {
          const [sx, sy] = imageRect(p, nx, ny, 0, 0);
          if (visible(sx - 3, sy - 3, 6)) { g.beginPath(); g.arc(sx, sy, 3, 0, 2 * Math.PI); g.fill(); p.drawn.cells += 1; }
        }
      }
    }
    g.globalAlpha = 1;
    const marks = [];
    if ($("layer-hits").checked) for (const hit of view.hits) if (hit.slide === p.info.slide && hit.side) marks.push([hit, hit === p.focus ? COLOURS.focus : COLOURS.hits, String(hit.rank)]);
    const q = view.query;
    if (q && q.slide === p.info.slide && q.side) marks.push([q, COLOURS.query, "query"]);
    if (p.focus && !marks.some((m) => m[0] === p.focus)) marks.push([p.focus, p.focus === q ? COLOURS.query : COLOURS.focus, p.focus === q ? "query" : String(p.focus.rank)]);
    for (const [m, colour, text] of marks) {
      const [sx, sy, sw, sh] = imageRect(p, m.x, m.y, m.side, m.side);
      const focus = m === p.focus;
      g.strokeStyle = colour;
      g.lineWidth = focus ? 3 : 2;
      g.strokeRect(sx, sy, sw, sh);
      if (m.nucleus) {  // a cell: its nucleus marked
        const [nx, ny] = imageRect(p, m.nucleus[0], m.nucleus[1], 0, 0);
        g.beginPath(); g.arc(nx, ny, Math.max(6, sw * 0.12), 0, 2 * Math.PI); g.stroke();
      }
      g.font = "12px system-ui, sans-serif";
      const tw = g.measureText(text).width + 6;
      g.fillStyle = colour;
      g.fillRect(sx, sy - 15, tw, 15);
      g.fillStyle = colour === COLOURS.query ? "#fff" : "#000";
      g.fillText(text, sx + 3, sy - 3);
      p.drawn.hits += 1;
    }
    if (p.measure) {  // the measuring line, its length at its end
      const [ax, ay] = imageRect(p, p.measure.a.x, p.measure.a.y, 0, 0);
      const [bx, by] = imageRect(p, p.measure.b.x, p.measure.b.y, 0, 0);
      g.globalAlpha = 1;
      g.lineWidth = 2;
      g.strokeStyle = "#fff";
      g.shadowColor = "#000";
      g.shadowBlur = 3;
      g.beginPath(); g.moveTo(ax, ay); g.lineTo(bx, by); g.stroke();
      for (const [x, y] of [[ax, ay], [bx, by]]) { g.beginPath(); g.arc(x, y, 3, 0, 2 * Math.PI); g.stroke(); }
      g.font = "bold 13px system-ui, sans-serif";
      g.fillStyle = "#fff";
      g.fillText(length(p).text, bx + 8, by - 8);
      g.shadowBlur = 0;
    }
    c.dataset.drawn = JSON.stringify(p.drawn);
  }

  // Turbo (Google's colour map, its polynomial approximation), t in [0, 1] -> CSS colour
  function turbo(t) {
    const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)), x2 = x * x, x3 = x2 * x, x4 = x3 * x, x5 = x4 * x;
    const r = 0.13572138 + 4.61539260 * x - 42.66032258 * x2 + 132.13108234 * x3 - 152.94239396 * x4 + 59.28637943 * x5;
    const g = 0.09140261 + 2.19418839 * x + 4.84296658 * x2 - 14.18503333 * x3 + 4.27729857 * x4 + 2.82956604 * x5;
    const b = 0.10667330 + 12.64194608 * x - 60.58204836 * x2 + 110.36276771 * x3 - 89.90310912 * x4 + 27.34824973 * x5;
    const c = (v) => Math.round(255 * Math.min(1, Math.max(0, v)));
    return `rgb(${c(r)}, ${c(g)}, ${c(b)})`;
  }

  function length(p) {  // the measuring line's length: um from the slide's mpp, else slide px
    const px = Math.hypot(p.measure.b.x - p.measure.a.x, p.measure.b.y - p.measure.a.y);
    if (!p.info.mpp) return { px, um: null, text: `${px.toFixed(0)} px` };
    const um = px * p.info.mpp;
    return { px, um, text: um >= 1000 ? `${(um / 1000).toFixed(3)} mm` : `${um.toFixed(um < 10 ? 2 : 1)} µm` };
  }

  function showLength(p) {
    const out = $("measure-length");
    if (!p || !p.measure) { out.hidden = true; out.textContent = ""; delete out.dataset.um; delete out.dataset.px; return; }
    const m = length(p);
    out.hidden = false;
    out.textContent = `${p.name === "hit" ? "" : "left: "}${m.text}`;
    out.dataset.px = String(m.px);
    if (m.um !== null) out.dataset.um = String(m.um); else delete out.dataset.um;
  }

  function setMeasuring(on) {
    view.measuring = on;
    $("measure").setAttribute("aria-pressed", String(on));
    $("measure").classList.toggle("on", on);
    for (const p of Object.values(panes)) p.viewer.canvas.style.cursor = on ? "crosshair" : "";
  }

  function clearMeasure() {
    for (const p of Object.values(panes)) { p.measure = null; draw(p); }
    showLength(null);
  }

  // -- tile scores of saved runs (`score --save-scores NAME`) ------------------------------------------------------
  async function loadRuns(p, slide) {
    const found = await getJSON(`/api/slides/${encodeURIComponent(slide)}/scores`);
    if (p.name !== "hit") return;
    const select = $("score-run");
    const keep = view.run;
    select.replaceChildren(new Option("none", ""));
    for (const r of found.runs) {
      const o = new Option(`${r.run} (${r.method}, ${r.table_name}, ${r.slide_tiles} tiles)`, r.run);
      o.title = `saved ${r.created}`;
      select.add(o);
    }
    view.run = found.runs.some((r) => r.run === keep) ? keep : "";
    select.value = view.run;
    $("score-control").hidden = !found.runs.length;
  }

  async function loadScores(p) {
    p.scores = null;
    if (!view.run || !p.info) return;
    const run = view.run;
    try {
      const layer = await getJSON(`/api/slides/${encodeURIComponent(p.info.slide)}/scores/${encodeURIComponent(run)}`);
      if (view.run === run) p.scores = layer;
    } catch (e) {
      if (!String(e.message).startsWith("404")) showError(`the scores of ${run} did not load (${e.message})`);
    }
  }

  function scoreLegend() {
    const p = panes.hit, s = p && p.scores;
    $("score-legend").hidden = !s;
    if (!s) return;
    const stops = [0, 0.25, 0.5, 0.75, 1].map((t) => `${turbo(t)} ${t * 100}%`).join(", ");
    $("score-ramp").style.background = `linear-gradient(to right, ${stops})`;
    const fmt = (v) => (v === null || v === undefined ? "?" : Math.abs(v) >= 100 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : v.toFixed(2));
    $("score-lo").textContent = fmt(s.lo);
    $("score-hi").textContent = fmt(s.hi);
    $("score-legend").title = `${s.run}: ${s.method} tile scores on ${s.table_name} (v${s.table_version}), colour scale = the run's 1st-99th percentile; slide score ${fmt(s.slide_score)}`;
  }

  async function showRun(run) {
    view.run = run;
    await Promise.all(Object.values(panes).filter((p) => p.info).map(loadScores));
    scoreLegend();
    redrawAll();
  }

  // -- slides like this slide ----------------------------------------------------------------------------------
  async function similar() {
    const p = panes.hit, list = $("similar-list");
    if (!p || !p.info) return;
    const table = $("table").value, signature = $("similar-signature").value;
    list.hidden = false;
    list.textContent = `searching ${table} for slides like ${p.info.slide} …`;
    try {
      const found = await getJSON(`/api/tables/${encodeURIComponent(table)}/slides/${encodeURIComponent(p.info.slide)}/similar?signature=${encodeURIComponent(signature)}&k=5`);
      list.replaceChildren();
      const head = document.createElement("div");
      head.className = "muted";
      head.textContent = `slides like ${found.slide} (${found.label ?? "no label"}) in ${found.table}, by ${found.kind} signature:`;
      list.append(head);
      if (!found.hits.length) list.append("no other slide");
      found.hits.forEach((h, i) => {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "similar-hit";
        b.dataset.slide = h.slide;
        b.textContent = `${i + 1}. ${h.slide} — ${h.label ?? "no label"} — ${h.score.toFixed(3)}`;
        b.addEventListener("click", () => openBeside(h));
        list.append(b);
      });
    } catch (e) {
      list.textContent = `similar slides: ${e.message}`;
    }
  }

  async function openBeside(hit) {  // a whole slide in the left pane, beside the current one
    view.query = null;
    $("pane-query").hidden = false;
    $("slide-view").classList.add("two");
    $("query-caption").textContent = `similar slide — ${hit.slide} (${hit.label ?? "no label"}, similarity ${hit.score.toFixed(3)})`;
    try {
      await openIn("query", { slide: hit.slide, whole: true });
    } catch (e) {
      showError(e.message);
    }
    for (const p of Object.values(panes)) { p.viewer.forceResize(); draw(p); }
  }

  function nice(raw) {
    const e = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [5, 2, 1]) if (m * e <= raw) return m * e;
    return e;
  }

  function scaleBar(p) {
    if (!p.info || !p.info.mpp || !p.viewer.world.getItemCount()) { p.bar.hidden = true; return; }
    const zoom = p.viewer.viewport.viewportToImageZoom(p.viewer.viewport.getZoom(true));  // screen px per slide px
    const umPerPx = p.info.mpp / zoom;
    const um = nice(120 * umPerPx);
    p.bar.hidden = false;
    p.bar.firstChild.style.width = `${um / umPerPx}px`;
    p.bar.lastChild.textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
    p.bar.dataset.um = String(um);
  }

  function centre(p, place, immediately) {
    const vp = p.viewer.viewport;
    if (place.whole) { vp.goHome(immediately); return; }
    const pad = place.side * 1.5;
    vp.fitBounds(vp.imageToViewportRectangle(place.x - pad, place.y - pad, place.side + 2 * pad, place.side + 2 * pad), immediately);
  }

  function tileSource(info, plane) {
    return {
      width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: info.overlap,
      minLevel: 0, maxLevel: info.levels - 1,
      getTileUrl: (level, x, y) => `${info.tiles}${level}/${x}_${y}.jpeg${plane ? "?plane=" + plane : ""}`,
    };
  }

  async function openIn(name, place) {
    const p = pane(name);
    const token = ++p.token;
    p.focus = place;
    p.anchor = place;
    p.clickedAt = performance.now();
    p.fullAt = null;
    const base = `/api/slides/${encodeURIComponent(place.slide)}`;
    const [info, overlays] = await Promise.all([getJSON(base), getJSON(`${base}/overlays`)]);
    if (token !== p.token) return;
    p.overlays = overlays;
    if (place.whole) {  // a whole slide (similar slides): anchored at its centre, nothing outlined
      Object.assign(place, { x: Math.round(info.width / 2), y: Math.round(info.height / 2), side: 0 });
      p.focus = null;
    }
    if (!p.info || p.info.slide !== info.slide) p.measure = null;
    const scored = p.name === "hit" ? loadRuns(p, info.slide).catch((e) => showError(`score runs: ${e.message}`)) : null;
    if (p.info && p.info.slide === info.slide && p.viewer.world.getItemCount()) {
      p.info = info;
      centre(p, place, false);
      await scored;
      await loadScores(p);
      scoreLegend();
      draw(p);
      return;
    }
    p.info = info;
    p.tilesLoaded = 0;
    p.tilesFailed = 0;
    await new Promise((resolve) => {
      p.viewer.addOnceHandler("open", () => {
        centre(p, place, true);
        const item = p.viewer.world.getItemAt(0);
        item.addHandler("fully-loaded-change", (e) => { if (e.fullyLoaded && !p.fullAt) p.fullAt = performance.now(); });
        resolve();
      });
      p.viewer.addOnceHandler("open-failed", resolve);
      p.viewer.open(tileSource(info, 0));
    });
    legend();
    await scored;
    await loadScores(p);
    scoreLegend();
    draw(p);
  }

  function legend() {
    const p = panes.hit;
    if (!p || !p.overlays) return;
    const tiles = p.overlays.tiles.map((l) => `${l.table} ${l.rows}`).join(", ");
    const cells = p.overlays.cells.map((l) => `${l.table} ${l.rows}`).join(", ");
    $("legend-tiles").textContent = tiles ? `tiles kept (${tiles})` : "tiles kept (none)";
    $("legend-cells").textContent = cells ? `cells found (${cells})` : "cells found (no cell table for this slide)";
    $("layer-cells").disabled = !cells;
    const planes = p.info ? p.info.planes : 1;
    $("plane-control").hidden = planes <= 1;
    $("plane").max = String(Math.max(0, planes - 1));
  }

  function syncFrom(source) {
    if (!view.sync || view.syncing) return;
    const other = source.name === "hit" ? panes.query : panes.hit;
    if (!other || !source.info || !other.info || !source.anchor || !other.anchor || $("pane-query").hidden) return;
    if (!source.viewer.world.getItemCount() || !other.viewer.world.getItemCount()) return;
    // the same physical scale and the same offset (in um) from each slide's anchor (the hit, the query)
    const sv = source.viewer.viewport, ov = other.viewer.viewport;
    const c = sv.viewportToImageCoordinates(sv.getCenter(false));
    const sa = source.anchor, oa = other.anchor;
    const ratio = (source.info.mpp || 1) / (other.info.mpp || 1);
    const ox = oa.x + oa.side / 2 + (c.x - sa.x - sa.side / 2) * ratio;
    const oy = oa.y + oa.side / 2 + (c.y - sa.y - sa.side / 2) * ratio;
    const imageZoom = sv.viewportToImageZoom(sv.getZoom(false)) / ratio;
    view.syncing = true;
    try {
      ov.zoomTo(ov.imageToViewportZoom(imageZoom), null, true);
      ov.panTo(ov.imageToViewportCoordinates(ox, oy), true);
    } finally {
      view.syncing = false;
    }
  }

  async function open(hit, result) {
    view.hits = result ? result.hits : [hit];
    view.query = result ? result.query_place : null;
    $("slide-view").hidden = false;
    showError("");
    const where = hit.nucleus ? `nucleus at ${hit.nucleus[0]}, ${hit.nucleus[1]}` : `${hit.x}, ${hit.y}`;
    $("slide-caption").textContent = `#${hit.rank} ${hit.label ?? "(no label)"} — ${hit.slide} @ ${where}`;
    const q = view.query;
    $("pane-query").hidden = !q;
    $("slide-view").classList.toggle("two", Boolean(q));
    const jobs = [openIn("hit", hit)];
    if (q) {
      $("query-caption").textContent = `query — ${q.slide} @ ${q.x}, ${q.y}`;
      jobs.push(openIn("query", q));
    }
    try {
      await Promise.all(jobs);
    } catch (e) {
      showError(e.message);
    }
    for (const p of Object.values(panes)) { p.viewer.forceResize(); draw(p); }
    const focus = panes.hit && panes.hit.viewer.canvas;
    if (focus) focus.focus({ preventScroll: true });
  }

  function close() {
    $("slide-view").hidden = true;
    setMeasuring(false);
    $("similar-list").hidden = true;
    for (const p of Object.values(panes)) { p.token += 1; p.viewer.close(); p.info = null; p.overlays = null; p.scores = null; p.measure = null; }
    showLength(null);
  }

  function redrawAll() { for (const p of Object.values(panes)) draw(p); }

  function wire() {
    for (const id of ["overlay-opacity", "layer-tiles", "layer-cells", "layer-hits"]) $(id).addEventListener("input", redrawAll);
    $("sync").addEventListener("change", (e) => { view.sync = e.target.checked; if (view.sync && panes.hit) syncFrom(panes.hit); });
    const zoom = (f) => { const p = panes.hit; if (p && p.info) p.viewer.viewport.zoomBy(f).applyConstraints(); };
    $("slide-zoom-in").addEventListener("click", () => zoom(1.5));
    $("slide-zoom-out").addEventListener("click", () => zoom(1 / 1.5));
    $("slide-centre").addEventListener("click", () => { for (const p of Object.values(panes)) if (p.info && p.anchor) centre(p, p.anchor, false); });
    $("slide-close").addEventListener("click", close);
    $("plane").addEventListener("change", (e) => {
      const p = panes.hit;
      if (p && p.info) { const b = p.viewer.viewport.getBounds(); p.viewer.open(tileSource(p.info, Number(e.target.value))); p.viewer.addOnceHandler("open", () => p.viewer.viewport.fitBounds(b, true)); }
    });
    $("measure").addEventListener("click", () => { setMeasuring(!view.measuring); if (!view.measuring) clearMeasure(); });
    $("score-run").addEventListener("change", (e) => showRun(e.target.value));
    $("similar").addEventListener("click", similar);
    document.addEventListener("keydown", (e) => {  // Esc clears the measuring line (and leaves measuring)
      if (e.key !== "Escape" || $("slide-view").hidden) return;
      if (view.measuring || Object.values(panes).some((p) => p.measure)) { clearMeasure(); setMeasuring(false); e.preventDefault(); }
    });
    $("slide-view").addEventListener("keydown", (e) => {  // keys also work with the focus outside the canvases
      if (e.target.closest && e.target.closest(".openseadragon-canvas")) return;  // OpenSeadragon's own keys there
      if (e.key === "+" || e.key === "=") { zoom(1.5); e.preventDefault(); }
      if (e.key === "-" || e.key === "_") { zoom(1 / 1.5); e.preventDefault(); }
      if (e.key === "0") { $("slide-centre").click(); e.preventDefault(); }
    });
  }

  window.slideView = { open, close, openBeside, showRun };
  document.addEventListener("DOMContentLoaded", wire);
})();

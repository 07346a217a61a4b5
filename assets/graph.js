// Block graphs of the chosen anchors, side by side, with the stitch edges between them.
// Runs as the `js_on_load` of a gr.HTML (arguments: element, trigger, props, server, upload, watch).
// Python sends the graph as props.value (see composer/ui/views.py: graph_value); every edit is
// sent back as a custom event, and Python answers with a new value (or the reason it refused):
//   'stitch_add'    {front: [anchor, block], back: [anchor, block]}   click a block, then another
//   'stitch_move'   {point: [f, j, b, k], end: 'front'|'back', to: [anchor, block]}   drag an edge end
//   'stitch_remove' {point: [f, j, b, k]}                               the x on an edge
//   'route_add'     {points: [[a, i], [b, j]] or [[a, i], [b, j], [b, l], [a, k]]}   two-way plans:
//                   where a route leaves an anchor and enters the other, then the head (to end
//                   there) or where it leaves and comes back
// In a two-way plan (props.value.two_way) links run both ways: small -> large solid from the right
// side of a column, large -> small dashed from the left side, each with an arrowhead at its end.
const NS = "http://www.w3.org/2000/svg";
const COL_W = 150, GAP = 96, ROW_H = 36, BOX_H = 28, TOP = 58, LEFT = 16;
const STAGE_FILL = ["#eef3fb", "#e6f4ea", "#fdf3e1", "#f3e8fb", "#e8f6f8"];
const root = element.querySelector(".zc-graph-root") || element;
let pending = null;     // [anchor, block] clicked first
let trail = [];         // two-way: the [anchor, block]s clicked so far for one route (at most 4)
let drag = null;

function svgEl(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}
function millions(n) { return n >= 1e6 ? (n / 1e6).toFixed(n >= 1e8 ? 0 : 2) + " M" : (n / 1e3).toFixed(1) + " k"; }
function colX(a) { return LEFT + a * (COL_W + GAP); }
function rowY(blocks, part) {
  const i = blocks.findIndex(b => b.part === part);
  return TOP + i * ROW_H;
}
function key(a, part) { return a + ":" + part; }

function draw() {
  const v = props.value || {};
  root.innerHTML = "";
  const bar = document.createElement("div");
  bar.className = "zc-graph-msg" + (v.error ? " zc-error" : "");
  bar.textContent = v.message || "";
  root.appendChild(bar);
  const anchors = v.anchors || [];
  if (!anchors.length) return;
  const rows = Math.max(...anchors.map(a => a.blocks.length));
  const width = LEFT * 2 + anchors.length * COL_W + (anchors.length - 1) * GAP;
  const height = TOP + rows * ROW_H + 10;
  const wrap = document.createElement("div");
  wrap.className = "zc-graph-scroll";
  root.appendChild(wrap);
  // Shrinks to the panel's width (never grows past its natural size); pointer maths use the CTM.
  const svg = svgEl("svg", {viewBox: `0 0 ${width} ${height}`, class: "zc-graph-svg",
                            style: `width: 100%; max-width: ${width}px; height: auto`}, wrap);
  const route = v.route || {nodes: [], edges: []};
  const onRoute = new Set(route.nodes.map(n => key(n[0], n[1])));
  const routeEdges = new Set(route.edges.map(e => e.join(",")));

  for (const a of anchors) {
    const x = colX(a.index);
    const t = svgEl("text", {x: x + COL_W / 2, y: 18, class: "zc-anchor-title", "text-anchor": "middle"}, svg);
    t.textContent = a.name;
    const s = svgEl("text", {x: x + COL_W / 2, y: 34, class: "zc-anchor-sub", "text-anchor": "middle"}, svg);
    s.textContent = `${millions(a.macs)} MACs · ${millions(a.params)} params`;
    a.blocks.forEach((b, i) => {
      const y = TOP + i * ROW_H;
      if (i > 0) svgEl("line", {x1: x + COL_W / 2, y1: y - ROW_H + BOX_H, x2: x + COL_W / 2, y2: y, class: "zc-flow"}, svg);
      const isUnit = typeof b.part === "number";
      const cls = ["zc-block", isUnit ? "zc-unit" : "zc-end"];
      if (onRoute.has(key(a.index, b.part))) cls.push("zc-on-route");
      if (pending && pending[0] === a.index && pending[1] === b.part) cls.push("zc-pending");
      if (trail.some(p => p[0] === a.index && p[1] === b.part)) cls.push("zc-pending");
      const g = svgEl("g", {class: cls.join(" "), "data-anchor": a.index, "data-part": b.part}, svg);
      const fill = b.stage >= 0 ? STAGE_FILL[b.stage % STAGE_FILL.length] : "#f4f5f7";
      svgEl("rect", {x, y, width: COL_W, height: BOX_H, rx: 5, fill}, g);
      const label = svgEl("text", {x: x + 7, y: y + 18, class: "zc-block-label"}, g);
      label.textContent = isUnit ? `${b.part} · ${b.shape}` : `${b.label} · ${b.shape}`;
      const m = svgEl("text", {x: x + COL_W - 6, y: y + 18, class: "zc-block-macs", "text-anchor": "end"}, g);
      m.textContent = millions(b.macs);
      const tip = svgEl("title", {}, g);
      tip.textContent = `${a.name} ${b.label}${b.stage >= 0 ? " (stage " + b.stage + ")" : ""}\n` +
        `output ${b.shape}\n${b.macs.toLocaleString()} MACs · ${b.params.toLocaleString()} params` +
        (isUnit ? (v.two_way ? "\nclick where a route leaves or enters this anchor"
                             : "\nclick, then click a block of a larger anchor to add a stitch")
                : (v.two_way && b.part === "head" ? "\nclick to end the route being clicked here" : ""));
    });
  }

  // A link leaves its front anchor on the side facing the back anchor: small -> large from the right
  // side of a column, large -> small (two-way plans) from the left side.
  const sides = (e) => {
    const [f, j, b, k] = e.point;
    return f < b ? [["R", f, j], ["L", b, k]] : [["L", f, j], ["R", b, k]];
  };
  const sideX = (side, a) => side === "R" ? colX(a) + COL_W : colX(a);
  // Several links can touch one side of a block: spread their ends along it, in the order of their
  // other ends, so every end has its own handle to drag and lines cross less.
  const ends = {};
  for (const e of v.edges || []) {
    const [[s1, f, j], [s2, b, k]] = sides(e);
    (ends[`${s1}:${f}:${j}`] = ends[`${s1}:${f}:${j}`] || []).push([rowY(anchors[b].blocks, k), e]);
    (ends[`${s2}:${b}:${k}`] = ends[`${s2}:${b}:${k}`] || []).push([rowY(anchors[f].blocks, j), e]);
  }
  const endY = (side, a, part, e) => {
    const list = ends[`${side}:${a}:${part}`].slice().sort((p, q) => p[0] - q[0]);
    const i = list.findIndex(p => p[1] === e), n = list.length;
    const y = rowY(anchors[a].blocks, part);
    return n === 1 ? y + BOX_H / 2 : y + 5 + (BOX_H - 10) * i / (n - 1);
  };
  const order = route.edges.map(e => e.join(","));   // the highlighted route's links, in route order
  for (const e of v.edges || []) {
    const [f, j, b, k] = e.point;
    const fa = anchors[f], ba = anchors[b];
    const [[s1], [s2]] = sides(e);
    const back = f > b;
    const x1 = sideX(s1, f), y1 = endY(s1, f, j, e);
    const x2 = sideX(s2, b), y2 = endY(s2, b, k, e);
    const dir = Math.sign(x2 - x1) || 1;
    const mx = (x1 + x2) / 2;
    const highlighted = routeEdges.has(e.point.join(","));
    const g = svgEl("g", {class: "zc-edge" + (back ? " zc-edge-back" : "") + (highlighted ? " zc-on-route" : ""),
                          "data-point": e.point.join(",")}, svg);
    const d = `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`;
    svgEl("path", {d, class: "zc-edge-hit"}, g);
    svgEl("path", {d, class: "zc-edge-line", stroke: e.colour}, g);
    if (v.two_way) {   // the curve ends level, so the arrowhead points straight along x
      const ax = x2 - dir * 5;
      svgEl("path", {d: `M ${ax} ${y2} L ${ax - dir * 9} ${y2 - 4.5} L ${ax - dir * 9} ${y2 + 4.5} Z`,
                     class: "zc-arrow", fill: e.colour}, g);
    }
    const tip = svgEl("title", {}, g);
    tip.textContent = `${fa.name} block ${j} -> ${ba.name} block ${k}\nstitch ${e.stitches.join(", ")} · layer ${e.layer}` +
      (e.r2 != null ? `\nfit R² ${e.r2.toFixed(3)}` : "") +
      (v.two_way ? "\ndrag an end to move it in every route through it; x removes it with its routes"
                 : "\ndrag an end to move it; x removes it");
    svgEl("circle", {cx: x1, cy: y1, r: 4.5, class: "zc-handle", "data-end": "front", fill: e.colour}, g);
    svgEl("circle", {cx: x2, cy: y2, r: 4.5, class: "zc-handle", "data-end": "back", fill: e.colour}, g);
    // links both ways share the gap: their remove buttons sit apart
    const rx = v.two_way ? mx + (back ? 10 : -10) : mx, ry = (y1 + y2) / 2;
    const rm = svgEl("g", {class: "zc-remove"}, g);
    svgEl("circle", {cx: rx, cy: ry, r: 7}, rm);
    const xt = svgEl("text", {x: rx, y: ry + 4, "text-anchor": "middle"}, rm);
    xt.textContent = "×";
    const step = order.indexOf(e.point.join(","));
    if (highlighted && order.length > 1 && step >= 0) {   // a there-and-back route: which link comes first
      const badge = svgEl("g", {class: "zc-route-step"}, g);
      svgEl("circle", {cx: x1 + dir * 16, cy: y1, r: 8}, badge);
      const n = svgEl("text", {x: x1 + dir * 16, y: y1 + 4, "text-anchor": "middle"}, badge);
      n.textContent = String(step + 1);
    }
  }
  // two-way: the links of the route being clicked, as dashed ghosts
  for (let i = 0; i + 1 < trail.length; i += 2) {
    const [[f, j], [b, k]] = [trail[i], trail[i + 1]];
    const x1 = f < b ? colX(f) + COL_W : colX(f), x2 = f < b ? colX(b) : colX(b) + COL_W;
    svgEl("line", {x1, y1: rowY(anchors[f].blocks, j) + BOX_H / 2, x2, y2: rowY(anchors[b].blocks, k) + BOX_H / 2,
                   class: "zc-ghost"}, svg);
  }
  if (v.fitted) {
    const lg = svgEl("text", {x: width - LEFT, y: height - 2, class: "zc-legend", "text-anchor": "end"}, svg);
    lg.textContent = "edge colour: fit R² (red ≤ 0.5, amber 0.75, green 1)" +
      (v.two_way ? " · solid: small → large, dashed: large → small" : "");
  } else if (v.two_way) {
    const lg = svgEl("text", {x: width - LEFT, y: height - 2, class: "zc-legend", "text-anchor": "end"}, svg);
    lg.textContent = "solid: small → large, dashed: large → small";
  }
}

function blockAt(clientX, clientY) {
  for (const n of document.elementsFromPoint(clientX, clientY)) {
    const g = n.closest && n.closest(".zc-unit");
    if (g && element.contains(g)) return [Number(g.dataset.anchor), Number(g.dataset.part)];
  }
  return null;
}

function setHint(text, isError) {
  const bar = root.querySelector(".zc-graph-msg");
  if (bar) { bar.textContent = text; bar.classList.toggle("zc-error", !!isError); }
}

element.addEventListener("click", (ev) => {
  if (drag && drag.moved) return;
  const rm = ev.target.closest(".zc-remove");
  if (rm) {
    const point = rm.closest(".zc-edge").dataset.point.split(",").map(Number);
    trigger("stitch_remove", {point});
    return;
  }
  const g = ev.target.closest(".zc-block");
  if (!g) return;
  if ((props.value || {}).two_way) { routeClick(g); return; }
  if (!g.classList.contains("zc-unit")) { setHint("stitches join blocks, not stems or heads", true); return; }
  const here = [Number(g.dataset.anchor), Number(g.dataset.part)];
  if (pending && pending[0] === here[0] && pending[1] === here[1]) {
    pending = null; draw(); setHint("selection cleared"); return;
  }
  if (!pending) {
    pending = here;
    draw();
    const a = (props.value.anchors || [])[here[0]];
    setHint(`${a ? a.name : "anchor " + here[0]} block ${here[1]} chosen: now click a block of a larger anchor (Esc cancels)`);
    return;
  }
  const front = pending;
  pending = null;
  trigger("stitch_add", {front, back: here});
});

// Two-way plans: a route is clicked junction by junction. Click 1: where it leaves anchor A;
// 2: where it enters B; then B's head ends it there (or Enter), or 3: where it leaves B and
// 4: where it comes back to A, which adds it. Python checks the route (and says what is wrong).
function anchorName(i) { const a = ((props.value || {}).anchors || [])[i]; return a ? a.name : "anchor " + i; }

function routeClick(g) {
  const a = Number(g.dataset.anchor);
  if (!g.classList.contains("zc-unit")) {
    if (trail.length === 2 && g.dataset.part === "head" && a === trail[1][0]) { addRoute(); return; }
    setHint(trail.length === 2 ? `click ${anchorName(trail[1][0])}'s head to end the route there, or the block ` +
            `of ${anchorName(trail[1][0])} where it leaves` : "routes join blocks, not stems or heads", true);
    return;
  }
  const here = [a, Number(g.dataset.part)];
  const [A, B] = [trail.length ? trail[0][0] : a, trail.length > 1 ? trail[1][0] : null];
  if (trail.length === 1 && a === A) { setHint(`the route enters the other anchor: click a block of it, not of ${anchorName(A)} (Esc cancels)`, true); return; }
  if (trail.length === 2 && a !== B) { setHint(`the route is in ${anchorName(B)}: click ${anchorName(B)}'s head to end there, or the block of ${anchorName(B)} where it leaves`, true); return; }
  if (trail.length === 3 && a !== A) { setHint(`the route comes back to ${anchorName(A)}: click a block of ${anchorName(A)}`, true); return; }
  trail.push(here);
  if (trail.length === 4) { addRoute(); return; }
  draw();
  const [i, j, l] = trail.map(p => p[1]);
  const [A2, B2] = [trail[0][0], trail.length > 1 ? trail[1][0] : null];
  setHint(trail.length === 1 ? `${anchorName(A2)} block ${i}: the route leaves ${anchorName(A2)} here. Click the block of the other anchor where it enters (Esc cancels)`
    : trail.length === 2 ? `${anchorName(A2)}[0..${i}] -> ${anchorName(B2)} from block ${j}: click ${anchorName(B2)}'s head to end there (or Enter), or the block of ${anchorName(B2)} where the route leaves to come back`
    : `${anchorName(A2)}[0..${i}] -> ${anchorName(B2)}[${j}..${l}]: click the block of ${anchorName(A2)} where the route comes back`);
}

function addRoute() {
  const points = trail;
  trail = [];
  trigger("route_add", {points});
}

element.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && (pending || trail.length)) { pending = null; trail = []; draw(); }
  if (ev.key === "Enter" && trail.length === 2) addRoute();
});

element.addEventListener("pointerdown", (ev) => {
  const h = ev.target.closest(".zc-handle");
  if (!h) return;
  ev.preventDefault();
  const edge = h.closest(".zc-edge");
  const svg = h.ownerSVGElement;
  const other = h.dataset.end === "front" ? edge.querySelector('[data-end="back"]') : edge.querySelector('[data-end="front"]');
  const ghost = svgEl("line", {x1: other.getAttribute("cx"), y1: other.getAttribute("cy"),
                               x2: h.getAttribute("cx"), y2: h.getAttribute("cy"), class: "zc-ghost"}, svg);
  drag = {handle: h, end: h.dataset.end, point: edge.dataset.point.split(",").map(Number), ghost, svg,
          x0: ev.clientX, y0: ev.clientY, moved: false};
  h.setPointerCapture(ev.pointerId);
});

element.addEventListener("pointermove", (ev) => {
  if (!drag) return;
  if (Math.abs(ev.clientX - drag.x0) + Math.abs(ev.clientY - drag.y0) > 4) drag.moved = true;
  const p = drag.svg.createSVGPoint();
  p.x = ev.clientX; p.y = ev.clientY;
  const q = p.matrixTransform(drag.svg.getScreenCTM().inverse());
  drag.ghost.setAttribute("x2", q.x);
  drag.ghost.setAttribute("y2", q.y);
});

element.addEventListener("pointerup", (ev) => {
  if (!drag) return;
  const d = drag;
  try { d.handle.releasePointerCapture(ev.pointerId); } catch (e) {}
  d.ghost.remove();
  setTimeout(() => { drag = null; }, 0);   // let the click that follows see `moved`
  if (!d.moved) return;
  const to = blockAt(ev.clientX, ev.clientY);
  if (!to) { setHint("drop the end of a stitch on a block", true); return; }
  trigger("stitch_move", {point: d.point, end: d.end, to});
});

watch("value", () => { pending = null; trail = []; draw(); });
draw();

// One status line about the latest action: a message on the graph that the status line no longer
// says (a newer action happened elsewhere) is cleared, so the two never disagree.
function watchStatus(tries) {
  const statusEl = document.getElementById("zc-status");
  if (!statusEl) { if (tries > 0) setTimeout(() => watchStatus(tries - 1), 500); return; }
  new MutationObserver(() => {
    const bar = root.querySelector(".zc-graph-msg");
    const said = bar ? bar.textContent.trim() : "";
    const text = statusEl.querySelector(".html-container") || statusEl;   // not the progress overlay's text
    const now = text.innerText.replace(/^\s*⚠\s*/, "").trim();
    if (said && now && !now.includes(said) && !said.includes(now)) {
      bar.textContent = "";
      bar.classList.remove("zc-error");
    }
  }).observe(statusEl, {childList: true, subtree: true, characterData: true});
}
watchStatus(20);

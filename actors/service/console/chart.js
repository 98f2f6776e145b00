// Line plots drawn as inline SVG from the stats the console polls: no chart library, nothing downloaded.

const NS = "http://www.w3.org/2000/svg";
const W = 640;
const H = 220;
const PAD = { left: 64, right: 16, top: 14, bottom: 30 };
const COLOURS = 8; // the stylesheet colours series s0..s7

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/** A round step for about `n` ticks up to `max`. */
function step(max, n) {
  const raw = max / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

const clock = (ms) => new Date(ms).toISOString().slice(11, 19);
const short = (n) => (n >= 1e6 ? `${+(n / 1e6).toFixed(1)}M` : n >= 1e4 ? `${+(n / 1e3).toFixed(1)}k` : `${+n.toFixed(2)}`);

/**
 * A line plot. `series`: [{name, points: [[t_ms, value], ...], dashed, label}]; `max`: the top of the scale (else
 * from the data). Returns a <figure> holding the SVG (an image with a text alternative) and its legend, which gives
 * each series' latest value (or its `label`).
 */
export function lineChart({ title, series, unit = "", note = "", max = null }) {
  const all = series.flatMap((s) => s.points);
  const fig = document.createElement("figure");
  fig.className = "chart";
  const cap = document.createElement("figcaption");
  cap.textContent = title;
  fig.append(cap);
  const latest = series.map((s) => s.label || `${s.name}: ${s.points.length ? s.points[s.points.length - 1][1] : "none"}${unit}`);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}. Latest: ${latest.join(", ") || "no data"}.` });
  svg.append(el("title", {}, title));
  fig.append(svg);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  svg.append(el("rect", { x: PAD.left, y: PAD.top, width: plotW, height: plotH, class: "plot" }));
  if (!all.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted" }, "no data yet"));
    return fig;
  }
  let t0 = Math.min(...all.map((p) => p[0]));
  let t1 = Math.max(...all.map((p) => p[0]));
  if (t1 === t0) {
    t0 -= 30_000;
    t1 += 30_000;
  }
  const top = max || Math.max(1, ...all.map((p) => p[1]));
  const dy = step(top, 4);
  const ymax = max || Math.ceil((top * 1.05) / dy) * dy;
  const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * plotW;
  const y = (v) => PAD.top + plotH - (v / ymax) * plotH;
  for (let v = 0; v <= ymax + 1e-9; v += dy) {
    svg.append(el("line", { x1: PAD.left, x2: PAD.left + plotW, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(el("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, `${short(v)}${unit}`));
  }
  svg.append(el("text", { x: PAD.left, y: H - 8, class: "tick" }, clock(t0)));
  svg.append(el("text", { x: PAD.left + plotW, y: H - 8, "text-anchor": "end", class: "tick" }, `${clock(t1)} UTC`));
  series.forEach((s, i) => {
    const cls = `line s${i % COLOURS}${s.dashed ? " dashed" : ""}`;
    if (s.points.length === 1) {
      const [t, v] = s.points[0];
      svg.append(el("circle", { cx: x(t), cy: y(v), r: 3.5, class: `dot s${i % COLOURS}` }));
    } else if (s.points.length > 1) {
      svg.append(el("polyline", { points: s.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "), class: cls }));
    }
  });
  const legend = document.createElement("ul");
  legend.className = "legend";
  series.forEach((s, i) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = `swatch s${i % COLOURS}${s.dashed ? " dashed" : ""}`;
    sw.setAttribute("aria-hidden", "true");
    li.append(sw, `${latest[i]}`);
    legend.append(li);
  });
  fig.append(legend);
  if (note) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = note;
    fig.append(p);
  }
  return fig;
}

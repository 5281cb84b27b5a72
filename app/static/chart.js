// A small SVG line chart: integer epochs on x, one line with a dot per point for each series.

import { svgElement as el } from "./ui.js";

const HEIGHT = 240; // the CSS height too: the width follows the element's, so text keeps its size
const MARGIN = { top: 12, right: 16, bottom: 34, left: 52 };

/** About `count` round tick values covering [low, high]. */
function ticks(low, high, count) {
  const span = high - low || 1;
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const values = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) values.push(Number(v.toPrecision(12)));
  return values;
}

function format(value) {
  return Math.abs(value) >= 100 || Number.isInteger(value) ? String(value) : value.toPrecision(3).replace(/\.?0+$/, "");
}

/**
 * Draws `series` ([{key, label, points: [[epoch, value], ...]}]) into `svg`, replacing what was there.
 * `epochs`: the x axis runs from 1 to at least this; `yRange`: fixed [min, max], else fitted to the data.
 */
export function drawChart(svg, { series, epochs = 1, yRange = null }) {
  const WIDTH = Math.max(280, Math.round(svg.getBoundingClientRect().width) || 480);
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  const all = series.flatMap((s) => s.points);
  const xMax = Math.max(2, epochs, ...all.map(([x]) => x));
  let [yMin, yMax] = yRange || [Math.min(...all.map(([, y]) => y)), Math.max(...all.map(([, y]) => y))];
  if (!all.length && !yRange) [yMin, yMax] = [0, 1];
  if (!yRange) {
    const pad = (yMax - yMin) * 0.08 || Math.abs(yMax) * 0.1 || 1;
    [yMin, yMax] = [Math.max(0, yMin - pad), yMax + pad];
  }
  const plotW = WIDTH - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const x = (epoch) => MARGIN.left + ((epoch - 1) / (xMax - 1)) * plotW;
  const y = (value) => MARGIN.top + (1 - (value - yMin) / (yMax - yMin)) * plotH;

  const axes = el("g", { class: "axes" }, svg);
  for (const value of ticks(yMin, yMax, 5)) {
    el("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(value), y2: y(value), class: "grid" }, axes);
    el("text", { x: MARGIN.left - 6, y: y(value), class: "tick y" }, axes).textContent = format(value);
  }
  for (const epoch of ticks(1, xMax, 8).filter(Number.isInteger)) {
    el("line", { x1: x(epoch), x2: x(epoch), y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom + 4 }, axes);
    el("text", { x: x(epoch), y: HEIGHT - MARGIN.bottom + 16, class: "tick x" }, axes).textContent = String(epoch);
  }
  el("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom }, axes);
  el("text", { x: MARGIN.left + plotW / 2, y: HEIGHT - 4, class: "axis-label" }, axes).textContent = "epoch";

  for (const { key, label, points } of series) {
    const group = el("g", { class: `series ${key}`, "data-series": key }, svg);
    if (points.length > 1) {
      el("polyline", { points: points.map(([px, py]) => `${x(px)},${y(py)}`).join(" ") }, group);
    }
    for (const [px, py] of points) {
      const dot = el("circle", { cx: x(px), cy: y(py), r: 3.5, "data-epoch": px, "data-value": py }, group);
      el("title", {}, dot).textContent = `epoch ${px}: ${label} ${format(py)}`;
    }
  }
}

/* sdxlpipe report: bar and line charts drawn as inline SVG (no library). */
"use strict";

window.CHARTS = (function () {
  const S = window.SDXLPIPE;

  /* Vertical bars: bars = [{label, value, title}]. Labels under the bars, values above. */
  function bars(container, items, opts) {
    const o = Object.assign({height: 220, barWidth: 34, gap: 8, yLabel: "", xLabel: ""}, opts || {});
    const left = 56, bottom = 52, top = 30;
    const width = Math.max(360, left + items.length * (o.barWidth + o.gap) + o.gap + 10);
    const plot = o.height - bottom - top;
    const peak = Math.max(1, ...items.map(function (b) { return b.value; }));
    const root = S.svg("svg", {width: width, height: o.height, viewBox: "0 0 " + width + " " + o.height,
                               class: "chart", role: "img"});
    axisY(root, left, top, plot, peak, width);
    items.forEach(function (b, i) {
      const x = left + o.gap + i * (o.barWidth + o.gap);
      const h = Math.round(plot * b.value / peak);
      const rect = S.svg("rect", {x: x, y: top + plot - h, width: o.barWidth, height: Math.max(h, b.value ? 1 : 0),
                                  class: "bar"});
      rect.appendChild(S.svg("title", {text: b.title || (b.label + ": " + b.value)}));
      root.appendChild(rect);
      root.appendChild(S.svg("text", {x: x + o.barWidth / 2, y: top + plot - h - 4, class: "value",
                                      "text-anchor": "middle", text: S.int(b.value)}));
      const lines = String(b.label).split("\n");
      lines.forEach(function (line, j) {
        root.appendChild(S.svg("text", {x: x + o.barWidth / 2, y: top + plot + 14 + 13 * j, class: "label",
                                        "text-anchor": "middle", text: line}));
      });
    });
    if (o.xLabel) root.appendChild(S.svg("text", {x: left, y: o.height - 6, class: "axis-title", text: o.xLabel}));
    if (o.yLabel) root.appendChild(S.svg("text", {x: 4, y: 12, class: "axis-title", text: o.yLabel}));
    container.appendChild(root);
    return root;
  }

  function axisY(root, left, top, plot, peak, width) {
    for (const f of [0, 0.5, 1]) {
      const y = top + plot - Math.round(plot * f);
      root.appendChild(S.svg("line", {x1: left - 4, x2: width - 6, y1: y, y2: y, class: f ? "grid" : "axis"}));
      root.appendChild(S.svg("text", {x: left - 8, y: y + 4, "text-anchor": "end", class: "tick",
                                      text: S.num(peak * f, 2)}));
    }
  }

  /* Lines: series = [{name, points: [[x, y], ...], class, dots}]. A long series is drawn at most
   * one point per pixel column (min and max kept), so 100k steps draw as fast as 1k. */
  function lines(container, series, opts) {
    const o = Object.assign({width: 560, height: 220, log: false, xLabel: "step", yLabel: ""}, opts || {});
    const left = 76, right = 12, top = 14, bottom = 34;
    const pw = o.width - left - right, ph = o.height - top - bottom;
    const all = [];
    series.forEach(function (s) { s.points.forEach(function (p) { if (p[1] !== null) all.push(p); }); });
    const root = S.svg("svg", {width: o.width, height: o.height, viewBox: "0 0 " + o.width + " " + o.height,
                               class: "chart", role: "img"});
    container.appendChild(root);
    if (!all.length) {
      root.appendChild(S.svg("text", {x: left, y: top + ph / 2, class: "label", text: "no values logged"}));
      return root;
    }
    const ty = o.log ? function (v) { return Math.log10(Math.max(v, 1e-12)); } : function (v) { return v; };
    // Loops, not Math.min(...array): spreading 100k arguments overflows the stack.
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const p of all) {
      const y = ty(p[1]);
      if (p[0] < x0) x0 = p[0];
      if (p[0] > x1) x1 = p[0];
      if (y < y0) y0 = y;
      if (y > y1) y1 = y;
    }
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { const pad = Math.abs(y0) * 0.05 || 1; y0 -= pad; y1 += pad; }
    const X = function (x) { return left + (x - x0) / (x1 - x0) * pw; };
    const Y = function (y) { return top + ph - (ty(y) - y0) / (y1 - y0) * ph; };
    for (const f of [0, 0.25, 0.5, 0.75, 1]) {
      const yv = y0 + f * (y1 - y0), y = top + ph - f * ph;
      root.appendChild(S.svg("line", {x1: left, x2: left + pw, y1: y, y2: y, class: f ? "grid" : "axis"}));
      root.appendChild(S.svg("text", {x: left - 6, y: y + 4, "text-anchor": "end", class: "tick",
                                      text: o.log ? tick(Math.pow(10, yv), Math.pow(10, yv)) : tick(yv, y1 - y0)}));
    }
    for (const f of [0, 0.5, 1]) {
      const xv = x0 + f * (x1 - x0);
      root.appendChild(S.svg("text", {x: left + f * pw, y: top + ph + 16, "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle",
                                      class: "tick", text: S.int(Math.round(xv))}));
    }
    root.appendChild(S.svg("text", {x: left + pw, y: o.height - 2, "text-anchor": "end", class: "axis-title", text: o.xLabel}));
    series.forEach(function (s) {
      const pts = thin(s.points.filter(function (p) { return p[1] !== null; }), X, pw);
      if (pts.length > 1) {
        root.appendChild(S.svg("polyline", {class: "line " + (s.class || ""),
          points: pts.map(function (p) { return X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1); }).join(" ")}));
      }
      if (s.dots || pts.length === 1) {
        pts.forEach(function (p) {
          const c = S.svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: 3.5, class: "dot " + (s.class || "")});
          c.appendChild(S.svg("title", {text: s.name + " " + S.num(p[1]) + " at step " + p[0]}));
          root.appendChild(c);
        });
      }
    });
    return root;
  }

  function thin(points, X, pw) {
    if (points.length <= 2 * pw) return points;
    const out = [];
    let col = -1, lo = null, hi = null;
    for (const p of points) {
      const c = Math.floor(X(p[0]));
      if (c !== col) {
        if (lo) { out.push(lo[0] <= hi[0] ? lo : hi); if (hi !== lo) out.push(lo[0] <= hi[0] ? hi : lo); }
        col = c; lo = hi = p;
      } else {
        if (p[1] < lo[1]) lo = p;
        if (p[1] > hi[1]) hi = p;
      }
    }
    if (lo) { out.push(lo[0] <= hi[0] ? lo : hi); if (hi !== lo) out.push(lo[0] <= hi[0] ? hi : lo); }
    return out;
  }

  /* A tick label with as many decimals as the axis' span needs (a flat LR of 1e-4 still reads apart). */
  function tick(v, span) {
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e5 || a < 1e-4) return v.toExponential(2);
    const d = Math.max(0, Math.min(8, Math.ceil(-Math.log10(Math.abs(span) || a)) + 2));
    return v.toFixed(d);
  }

  /* Exponential moving average (TensorBoard's smoothing) of [[x, y]]. */
  function smooth(points, weight) {
    let last = null;
    return points.map(function (p) {
      last = last === null ? p[1] : last * weight + p[1] * (1 - weight);
      return [p[0], last];
    });
  }

  return {bars: bars, lines: lines, smooth: smooth};
})();

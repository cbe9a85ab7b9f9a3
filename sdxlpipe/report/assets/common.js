/* sdxlpipe report: what every page shares. Plain JS, no build step, no network.
 *
 * Data arrive as <script src="data/NAME.js"> files that call SDXLPIPE.put(NAME, value):
 * a page opened from file:// may load scripts but not fetch() files. Text from the data
 * (captions, paths, settings) is only ever set as textContent, never parsed as HTML.
 */
"use strict";

window.SDXLPIPE = (function () {
  const arrived = new Map();   // name -> value, until taken
  const pending = new Map();   // name -> Promise of the value

  function put(name, value) {
    arrived.set(name, value);
  }

  /* The value of data/NAME.js, loaded once (later calls share the promise; the caller keeps it). */
  function load(name) {
    if (pending.has(name)) return pending.get(name);
    const promise = new Promise(function (resolve, reject) {
      if (arrived.has(name)) {
        resolve(take(name));
        return;
      }
      const script = document.createElement("script");
      script.src = "data/" + name + ".js";
      script.onload = function () {
        script.remove();
        if (arrived.has(name)) resolve(take(name));
        else reject(new Error("data/" + name + ".js did not hold " + name));
      };
      script.onerror = function () {
        script.remove();
        pending.delete(name);  // a later call may try again
        reject(new Error("could not load data/" + name + ".js (rebuild the report: sdxlpipe report)"));
      };
      document.head.appendChild(script);
    });
    pending.set(name, promise);
    return promise;
  }

  /* Forget a loaded value (a chunk evicted from a page's cache), so memory stays bounded. */
  function forget(name) {
    pending.delete(name);
    arrived.delete(name);
  }

  function take(name) {
    const value = arrived.get(name);
    arrived.delete(name);
    return value;
  }

  /* A value put by a <script> the page already ran (the summary), or undefined. */
  function now(name) {
    return arrived.get(name);
  }

  /* el("td", {class: "num", "data-k": "images"}, "12", child...) */
  function el(tag, attrs) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (let i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  function append(node, child) {
    if (child === undefined || child === null || child === false) return;
    if (Array.isArray(child)) child.forEach(function (c) { append(node, c); });
    else node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = String(v);
      else node.setAttribute(k, String(v));
    }
    return node;
  }

  function int(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }

  function num(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    const d = digits === undefined ? 4 : digits;
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    return Number(x.toFixed(d)).toString();
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function when(seconds) {
    if (!seconds) return "–";
    const d = new Date(seconds * 1000);
    return d.toISOString().replace("T", " ").slice(0, 16) + " UTC";
  }

  /* The nav bar and the "built from" line; every page calls it first. */
  function header(page, meta) {
    const nav = document.getElementById("nav");
    for (const [href, label, id] of [["index.html", "Dataset", "dataset"], ["runs.html", "Runs", "runs"],
                                     ["store.html", "Store", "store"]]) {
      nav.appendChild(el("a", {href: href, class: id === page ? "here" : null, text: label}));
    }
    if (meta) {
      document.getElementById("built").textContent =
        meta.title + " · " + meta.config + " · built " + when(meta.built);
      document.title = "sdxlpipe · " + meta.title + " · " + page;
    }
  }

  function fail(error) {
    const box = document.getElementById("error");
    box.hidden = false;
    box.textContent = "Error: " + (error && error.message ? error.message : String(error));
    console.error(error);
  }

  /* A table from rows of cells (headings null: no header row); a cell is text, a node, or {text, class, k} (k: data-k for tests). */
  function table(headings, rows, attrs) {
    const head = headings ? el("thead", null, el("tr", null, headings.map(function (h) { return el("th", {text: h}); }))) : null;
    const body = rows.map(function (cells) {
      const tr = el("tr", cells.attrs || null);
      for (const c of cells.cells || cells) {
        if (c !== null && typeof c === "object" && !(c instanceof Node)) {
          tr.appendChild(el("td", {class: c.class, "data-k": c.k, title: c.title}, c.node || c.text));
        } else {
          tr.appendChild(el("td", null, c));
        }
      }
      return tr;
    });
    return el("table", attrs || null, head, el("tbody", null, body));
  }

  return {put: put, load: load, forget: forget, now: now, el: el, svg: svg, int: int, num: num, bytes: bytes,
          when: when, header: header, fail: fail, table: table};
})();

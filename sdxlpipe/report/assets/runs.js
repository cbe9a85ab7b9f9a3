/* sdxlpipe report: the Runs page. The list comes with the page (data/runs.js); a run's curves,
 * images and settings (data/run/KEY.js) load when it is opened. #KEY in the URL names the open run. */
"use strict";

(function () {
  const S = window.SDXLPIPE, el = S.el;
  const data = S.now("runs");
  if (!data) {
    S.header("runs");
    S.fail(new Error("data/runs.js is missing: build the report with `sdxlpipe report`"));
    return;
  }
  S.header("runs", data.meta);
  const runs = data.runs;
  // Charts of these scalars, in this order; anything else logged gets a chart after them.
  const KNOWN = [["loss", "training loss", false], ["val_loss", "validation loss (held-out items, fixed noise)", false],
                 ["lr", "learning rate", false], ["grad_norm", "gradient norm (before clipping)", true]];
  let generation = 0;

  list();
  window.addEventListener("hashchange", open);
  open();

  function short(key) { return key.slice(0, 12); }

  function list() {
    const box = document.getElementById("run-list");
    if (!runs.length) {
      box.appendChild(el("p", {class: "empty", text: "No training runs in this workspace yet: `sdxlpipe run all` trains one."}));
      return;
    }
    box.appendChild(S.table(["run", "started", "steps", "network", "final loss", "best validation", "exports", "changed settings"],
      runs.slice().reverse().map(function (r) {
        const best = r.best_validation;
        return {attrs: {class: "clickable", "data-run": r.key, onclick: function () { location.hash = r.key; }}, cells: [
          el("code", {text: short(r.key)}), S.when(r.started),
          {text: S.int(r.steps_done) + (r.steps ? " / " + S.int(r.steps) : "") + (r.finished ? "" : " (unfinished)"), class: "num"},
          r.network || "–", {text: S.num(r.final_loss), class: "num", k: "final_loss"},
          {text: best ? S.num(best.val_loss) + " at step " + best.step : "–", class: "num"},
          {text: S.int(r.exports), class: "num"},
          {text: r.changed === null ? "first run" : S.int(r.changed), class: "num"}]};
      })));
  }

  async function open() {
    const key = location.hash.slice(1) || (runs.length ? runs[runs.length - 1].key : "");
    if (!key) return;
    const my = ++generation;
    document.querySelectorAll("tr[data-run]").forEach(function (tr) { tr.classList.toggle("selected", tr.dataset.run === key); });
    let run;
    try {
      run = await S.load("run/" + key);
    } catch (e) {
      S.fail(e);
      return;
    }
    if (my !== generation) return;
    document.getElementById("run").hidden = false;
    document.getElementById("run-key").textContent = key;
    document.getElementById("run-state").textContent = run.done ? "finished" : "unfinished (or running)";
    cards(run);
    charts(run);
    validation(run);
    settings(run);
    checkpoints(run);
    exportsOf(run);
  }

  function stat(value, label, k) {
    return el("div", {class: "stat"}, el("b", {"data-k": k, text: value}), el("span", {text: label}));
  }

  function cards(run) {
    const d = run.done || {}, loss = run.log.loss || [];
    const best = d.best_validation;
    document.getElementById("run-cards").replaceChildren(
      stat(S.int(loss.length ? loss[loss.length - 1][0] : 0), "steps logged", "steps"),
      stat(S.num(d.final_loss), "final loss", "final_loss"),
      stat(S.num(d.eval_loss_before) + " → " + S.num(d.eval_loss_after), "fixed-noise loss on training batches, before → after", "eval_loss"),
      stat(best ? "step " + best.step : "–", best ? "lowest validation loss (" + S.num(best.val_loss) + ")" : "no validation loss", "best_step"),
      stat(d.seconds ? S.num(d.seconds, 1) + " s" : "–", "training time", "seconds"));
  }

  function charts(run) {
    const box = document.getElementById("charts");
    box.replaceChildren();
    const names = KNOWN.map(function (k) { return k[0]; });
    const extra = Object.keys(run.log).filter(function (n) { return names.indexOf(n) < 0; }).sort();
    const best = run.done && run.done.best_validation;
    for (const [name, title, log] of KNOWN.concat(extra.map(function (n) { return [n, n, false]; }))) {
      const points = run.log[name];
      if (!points || !points.length) continue;
      const last = points[points.length - 1];
      const fig = el("figure", {"data-chart": name},
        el("figcaption", null, title + " · last ", el("b", {"data-k": "last", text: S.num(last[1])}),
           " at step " + last[0] + " · ", el("span", {"data-k": "points", text: points.length}), " points"));
      const series = [];
      if (name === "loss" && points.length > 10) {
        series.push({name: "loss", points: points, class: "raw"});
        series.push({name: "smoothed", points: CHARTS.smooth(points, points.length > 200 ? 0.95 : 0.8)});
      } else {
        series.push({name: name, points: points, class: name === "val_loss" ? "val" : "", dots: name === "val_loss" || points.length < 30});
      }
      if (name === "val_loss" && best) series.push({name: "lowest", points: [[best.step, best.val_loss]], class: "val best", dots: true});
      CHARTS.lines(fig, series, {log: log});
      box.appendChild(fig);
    }
    if (!box.children.length) box.appendChild(el("p", {class: "empty", text: "nothing logged yet"}));
  }

  function validation(run) {
    const v = run.validation, box = document.getElementById("validation-box");
    box.hidden = !v.steps.length;
    if (!v.steps.length) return;
    const range = document.getElementById("v-step"), label = document.getElementById("v-label");
    const grid = document.getElementById("v-grid");
    range.max = String(v.steps.length - 1);
    range.value = String(v.steps.length - 1);
    function draw() {
      const [step, names] = v.steps[+range.value];
      label.textContent = "step " + S.int(step) + " (" + (+range.value + 1) + " of " + v.steps.length + ")";
      label.dataset.step = String(step);
      const dir = "runs/" + run.key + "/validation/step-" + String(step).padStart(8, "0") + "/";
      grid.replaceChildren(...names.map(function (name, i) {
        const n = parseInt(name.replace(/\D/g, ""), 10);
        const prompt = v.prompts[isNaN(n) ? i : n] || name;
        return el("figure", null, el("img", {src: dir + name, alt: prompt}), el("figcaption", {text: prompt}));
      }));
      document.getElementById("v-prev").disabled = +range.value === 0;
      document.getElementById("v-next").disabled = +range.value === v.steps.length - 1;
    }
    range.oninput = draw;
    document.getElementById("v-prev").onclick = function () { range.value = String(+range.value - 1); draw(); };
    document.getElementById("v-next").onclick = function () { range.value = String(+range.value + 1); draw(); };
    draw();
  }

  function show(value) {
    if (value === null || value === undefined) return "–";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  function settings(run) {
    const c = run.config || {};
    const rows = [["model", show(c.model)], ["vae", show(c.vae)], ["store", show(c.store)]];
    for (const [k, v] of Object.entries(c.train || {})) rows.push(["train." + k, show(v)]);
    document.getElementById("settings").replaceChildren(el("div", {class: "meta-list"}, S.table(["setting", "value"],
      rows.map(function (r) { return [{text: r[0], class: "path"}, r[1]]; }))));
    const box = document.getElementById("changed");
    if (run.changed === null) box.replaceChildren(el("p", {class: "empty", text: "the first run in this workspace"}));
    else if (!run.changed.length) box.replaceChildren(el("p", {class: "empty", text: "no setting changed (the dataset or weights did)"}));
    else box.replaceChildren(el("div", {class: "meta-list"}, S.table(["setting", "before", "now"], run.changed.map(function (r) {
      return {attrs: {"data-setting": r[0]}, cells: [{text: r[0], class: "path"}, show(r[1]), show(r[2])]};
    }))));
  }

  function checkpoints(run) {
    const box = document.getElementById("checkpoints");
    box.replaceChildren(run.checkpoints.length ? S.table(["step", "files", "size", "folder"], run.checkpoints.map(function (c) {
      const total = Object.values(c.files).reduce(function (a, b) { return a + b; }, 0);
      return [{text: S.int(c.step), class: "num"}, Object.keys(c.files).join(", "), {text: S.bytes(total), class: "num"},
              {text: c.path, class: "path"}];
    })) : el("p", {class: "empty", text: "no checkpoint kept"}));
  }

  function exportsOf(run) {
    const box = document.getElementById("exports");
    const rows = [];
    for (const e of run.exports) {
      for (const f of e.files) {
        const i = f.info || {};
        const meta = f.metadata ? el("details", null, el("summary", {text: Object.keys(f.metadata).length + " metadata keys"}),
          S.table(["key", "value"], Object.entries(f.metadata).sort().map(function (kv) {
            return [{text: kv[0], class: "path"}, kv[1].length > 300 ? kv[1].slice(0, 297) + "…" : kv[1]];
          }))) : null;
        rows.push({attrs: {"data-file": f.path}, cells: [{text: f.path, class: "path"}, f.format,
          f.error ? {text: f.error, class: "reason"} : (i.format || "–") + " / " + (i.network || "–"),
          {text: i.modules === undefined ? "–" : S.int(i.modules), class: "num", k: "modules"},
          {text: (i.ranks || []).join(", "), class: "num", k: "ranks"}, {text: (i.alphas || []).join(", "), class: "num", k: "alphas"},
          {text: S.bytes(f.bytes), class: "num"}, meta || ""]});
      }
    }
    box.replaceChildren(rows.length ? S.table(["file", "written as", "lora info: format / network", "modules", "ranks", "alphas", "size", "metadata"], rows)
      : el("p", {class: "empty", text: "nothing exported from this run"}));
  }
})();

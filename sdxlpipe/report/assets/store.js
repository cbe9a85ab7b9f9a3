/* sdxlpipe report: the Store page (data/store.js: `store du`, each shard, the published datasets, the workspace's tables). */
"use strict";

(function () {
  const S = window.SDXLPIPE, el = S.el;
  const data = S.now("store");
  if (!data) {
    S.header("store");
    S.fail(new Error("data/store.js is missing: build the report with `sdxlpipe report`"));
    return;
  }
  S.header("store", data.meta);
  const stages = Object.entries(data.stages);
  const items = stages.reduce(function (n, kv) { return n + kv[1].items; }, 0);
  const shards = stages.reduce(function (n, kv) { return n + kv[1].shards; }, 0);

  document.getElementById("overview").append(
    stat(data.url, "store", "url"), stat(S.bytes(data.bytes), "in shards", "bytes"),
    stat(S.int(items), "items", "items"), stat(S.int(shards), "shards", "shards"));

  document.getElementById("stages").appendChild(stages.length ? S.table(["stage", "items", "shards", "size", "by model fingerprint"],
    stages.map(function (kv) {
      const [name, s] = kv;
      const groups = Object.entries(s.groups || {}).map(function (g) { return (g[0] || "(none recorded)") + ": " + S.bytes(g[1]); });
      return {attrs: {"data-stage": name}, cells: [name, {text: S.int(s.items), class: "num", k: "items"},
        {text: S.int(s.shards), class: "num", k: "shards"}, {text: S.bytes(s.bytes), class: "num", k: "bytes"},
        {text: groups.join("; "), class: "path"}]};
    })) : el("p", {class: "empty", text: "The store is empty: `sdxlpipe run encode` fills it."}));

  const datasets = data.datasets || [];
  document.getElementById("datasets").appendChild(datasets.length ? S.table(["dataset", "snapshot", "samples", "items", "size", "published"],
    datasets.map(function (d) {
      if (d.error) return {attrs: d.name ? {"data-dataset": d.name} : {}, cells: [d.name || "", {text: d.error, class: "error"}, "", "", "", ""]};
      return {attrs: {"data-dataset": d.name}, cells: [d.name, {text: d.snapshot.slice(0, 12), k: "snapshot", title: d.snapshot},
        {text: S.int(d.samples), class: "num", k: "samples"}, {text: S.int(d.items), class: "num", k: "items"},
        {text: S.bytes(d.bytes), class: "num", k: "bytes", title: String(d.bytes)}, {text: S.when(d.published), k: "published"}]};
    })) : el("p", {class: "empty", text: "No dataset is published: `sdxlpipe run encode` publishes the config's."}));

  document.getElementById("tables").appendChild(data.tables.length ? S.table(["stage", "rows", "size"], data.tables.map(function (t) {
    return {attrs: {"data-table": t.stage}, cells: [t.stage, {text: S.int(t.rows), class: "num", k: "rows"}, {text: S.bytes(t.bytes), class: "num"}]};
  })) : el("p", {class: "empty", text: "no stage has run in this workspace"}));

  const box = document.getElementById("shards");
  for (const [name, s] of stages) {
    box.appendChild(el("h3", {text: name + " · " + S.int(s.shards) + " shards" +
      (s.shards_listed < s.shard_list.length || s.shards_listed < s.shards ? " (the " + S.int(s.shards_listed) + " largest listed)" : "")}));
    box.appendChild(el("div", {class: "meta-list"}, S.table(["shard", "items", "bytes of items"], s.shard_list.map(function (r) {
      return [el("code", {text: r[0]}), {text: S.int(r[1]), class: "num"}, {text: S.bytes(r[2]), class: "num"}];
    }))));
  }

  function stat(value, label, k) {
    return el("div", {class: "stat"}, el("b", {"data-k": k, text: value}), el("span", {text: label}));
  }
})();

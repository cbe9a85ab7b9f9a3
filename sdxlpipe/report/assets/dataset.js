/* sdxlpipe report: the Dataset page.
 *
 * First paint needs only data/summary.js (its size does not grow with the dataset). The gallery
 * then loads the item chunk it shows (data/items/NNNNN.js, CHUNK items each); a filter scans the
 * chunks that can match (data/facets.js names them), showing the first page as soon as it is full
 * and counting the rest as it goes. The state lives in the URL's #fragment, so a filtered view
 * can be bookmarked and the back button works.
 */
"use strict";

(function () {
  const S = window.SDXLPIPE, el = S.el;
  const PAGE = 60;           // cards per page: about three screens
  const KEEP_CHUNKS = 24;    // item chunks kept in memory (least recently used go first)
  const summary = S.now("summary");
  if (!summary) {
    S.header("dataset");
    S.fail(new Error("data/summary.js is missing: build the report with `sdxlpipe report`"));
    return;
  }
  const F = Object.fromEntries(summary.fields.map(function (f, i) { return [f, i]; }));
  const R = Object.fromEntries(summary.reject_fields.map(function (f, i) { return [f, i]; }));
  const info = summary.inspect;
  S.header("dataset", summary.meta);

  overview();
  sourcesAndSubsets();
  buckets();
  captions();
  tags();
  rejects();
  const gallery = makeGallery();
  gallery.start();

  // --- summary sections ------------------------------------------------------------------

  function stat(value, label, k) {
    return el("div", {class: "stat"}, el("b", {"data-k": k, text: value}), el("span", {text: label}));
  }

  function overview() {
    const box = document.getElementById("overview");
    box.append(
      stat(S.int(info.samples), "images", "samples"),
      stat(S.int(info.samples_per_epoch), "samples per epoch (with repeats)", "samples_per_epoch"),
      stat(S.int(summary.rejected), "rejected files", "rejected"),
      stat(S.int(info.held_out.items), "held out for the validation loss", "held_out"),
      stat(S.int(info.buckets.length), "buckets", "bucket_count"),
      stat(S.int(info.batch_size), "batch size", "batch_size"),
      stat(S.int(info.samples_in_short_batches), "samples in short batches", "samples_in_short_batches"),
      stat(summary.flip ? "on" : "off", "flipped latents (flip_aug)", "flip"));
  }

  function sourcesAndSubsets() {
    document.getElementById("sources").appendChild(summary.sources.length ? S.table(
      ["source", "kind", "repeats", "images", "regularisation"],
      summary.sources.map(function (s, i) {
        return {attrs: {"data-source": i}, cells: [{text: s.label, class: "path"}, s.kind, {text: s.repeats, class: "num"},
          {text: S.int(summary.source_images[i]), class: "num", k: "images"}, s.is_reg ? "yes" : ""]};
      })) : el("p", {class: "empty", text: "no sources in the config"}));
    const names = Object.keys(info.sources);
    document.getElementById("subsets").appendChild(names.length ? S.table(
      ["subset", "images", "samples / epoch", "captions from"],
      names.map(function (name) {
        const s = info.sources[name];
        const from = Object.entries(s.caption_from).sort().map(function (kv) { return kv[0] + " " + kv[1]; }).join(", ");
        return {attrs: {"data-subset": name}, cells: [
          el("a", {href: "#subset=" + summary.subsets.indexOf(name),
                   text: name + (s.is_reg ? " (reg)" : "") + (s.validation ? " (validation)" : "")}),
          {text: S.int(s.images), class: "num", k: "images"},
          {text: S.int(s.samples_per_epoch), class: "num", k: "samples_per_epoch"}, from]};
      })) : el("p", {class: "empty", text: "no images"}));
  }

  function buckets() {
    const b = info.batch_size;
    document.getElementById("bucket-note").textContent = "Samples per epoch in each bucket (width × height, pixels) " +
      "at batch size " + b + ". A bucket whose samples do not fill whole batches ends each epoch with a short batch.";
    CHARTS.bars(document.getElementById("bucket-chart"), info.buckets.map(function (k) {
      return {label: k.bucket[0] + "\n" + k.bucket[1], value: k.samples_per_epoch,
              title: k.bucket[0] + "×" + k.bucket[1] + ": " + k.images + " images, " + k.samples_per_epoch + " samples per epoch"};
    }), {yLabel: "samples per epoch", xLabel: "bucket: width over height"});
    document.getElementById("buckets").appendChild(S.table(
      ["bucket", "aspect", "images", "samples / epoch", "full batches", "short batch"],
      info.buckets.map(function (k, i) {
        return {attrs: {"data-bucket": k.bucket[0] + "x" + k.bucket[1]}, cells: [
          el("a", {href: "#bucket=" + i, text: k.bucket[0] + " × " + k.bucket[1]}),
          {text: (k.bucket[0] / k.bucket[1]).toFixed(3), class: "num"},
          {text: S.int(k.images), class: "num", k: "images"},
          {text: S.int(k.samples_per_epoch), class: "num", k: "samples_per_epoch"},
          {text: S.int(k.full_batches), class: "num", k: "full_batches"},
          {text: k.short_batch ? k.short_batch + " samples" : "", class: "num", k: "short_batch"}]};
      })));
  }

  function spread(s) {
    return s ? "min " + s.min + " · median " + s.median + " · p95 " + s.p95 + " · max " + s.max : "–";
  }

  function captions() {
    const c = info.captions;
    document.getElementById("captions").appendChild(S.table(null, [
      ["words per caption", {text: spread(c.words), k: "words"}],
      ["CLIP tokens per caption", {text: c.tokens ? spread(c.tokens) : c.tokenizer, k: "tokens"}],
      ["over the 75-token window", {text: c.over_token_window === null ? "–" : S.int(c.over_token_window), k: "over_token_window"}],
      ["empty captions", {text: S.int(c.empty), k: "empty"}],
    ]));
    const h = summary.caption_words;
    if (h.counts.length) {
      CHARTS.bars(document.getElementById("caption-chart"), h.counts.map(function (n, i) {
        const lo = i * h.width, hi = lo + h.width - 1;
        return {label: h.width === 1 ? String(lo) : lo + "–" + hi, value: n, title: n + " captions of " + lo + "–" + hi + " words"};
      }), {barWidth: 28, gap: 6, height: 190, yLabel: "captions", xLabel: "words per caption"});
    }
  }

  function tags() {
    const top = info.top_tags;
    const box = document.getElementById("tags");
    if (!top.length) { box.appendChild(el("p", {class: "empty", text: "no tags"})); return; }
    const peak = top[0][1];
    const grid = el("div", {class: "tagbars"});
    for (const [tag, n] of top) {
      grid.append(el("a", {href: "#tag=" + encodeURIComponent(tag), title: tag, text: tag}),
                  el("div", null, el("div", {class: "bar", style: "width:" + (100 * n / peak).toFixed(1) + "%"})),
                  el("span", {class: "n", "data-tag": tag, text: S.int(n)}));
    }
    box.appendChild(grid);
  }

  function rejects() {
    document.getElementById("reject-count").textContent = "(" + S.int(summary.rejected) + ")";
    const box = document.getElementById("rejects");
    if (!summary.rejected) { box.appendChild(el("p", {class: "empty", text: "none: every file was read"})); return; }
    S.load("rejects/00000").then(function (chunk) {
      const shown = chunk.slice(0, 20);
      box.appendChild(S.table(["file", "reason"], shown.map(function (r) {
        return [{text: r[R.path], class: "path"}, {text: r[R.reason], class: "reason"}];
      })));
      box.appendChild(el("p", null, el("a", {href: "#rejected=1", text: summary.rejected > shown.length ?
        "all " + S.int(summary.rejected) + " in the gallery below" : "see them in the gallery below"})));
    }).catch(S.fail);
  }

  // --- the gallery -------------------------------------------------------------------------

  function makeGallery() {
    const grid = document.getElementById("grid"), status = document.getElementById("status");
    const prev = document.getElementById("prev"), next = document.getElementById("next");
    const inputs = {bucket: document.getElementById("f-bucket"), subset: document.getElementById("f-subset"),
                    source: document.getElementById("f-source"), tag: document.getElementById("f-tag"),
                    q: document.getElementById("f-q"), rejected: document.getElementById("f-rejected")};
    const cache = new Map();  // chunk name -> records, in order of use
    let generation = 0, facets = null, typing = null;

    summary.buckets.forEach(function (b, i) { inputs.bucket.appendChild(el("option", {value: i, text: b[0] + " × " + b[1]})); });
    summary.subsets.forEach(function (s, i) { inputs.subset.appendChild(el("option", {value: i, text: s})); });
    summary.sources.forEach(function (s, i) { inputs.source.appendChild(el("option", {value: i, text: s.label})); });

    function chunk(kind, i) {
      const name = kind + "/" + String(i).padStart(5, "0");
      if (cache.has(name)) {
        const value = cache.get(name);
        cache.delete(name);
        cache.set(name, value);
        return Promise.resolve(value);
      }
      return S.load(name).then(function (value) {
        cache.set(name, value);
        S.forget(name);
        while (cache.size > KEEP_CHUNKS) cache.delete(cache.keys().next().value);
        return value;
      });
    }

    function loadFacets() {
      if (!facets) {
        facets = S.load("facets").then(function (f) {
          const list = document.getElementById("tag-list");
          Object.keys(f.tags).forEach(function (t) { list.appendChild(el("option", {value: t})); });
          return f;
        });
      }
      return facets;
    }

    function readState() {
      const p = new URLSearchParams(location.hash.slice(1));
      return {bucket: p.get("bucket") || "", subset: p.get("subset") || "", source: p.get("source") || "",
              tag: p.get("tag") || "", q: p.get("q") || "", rejected: p.get("rejected") === "1",
              page: Math.max(0, parseInt(p.get("page") || "1", 10) - 1) || 0};
    }

    function writeState(state) {
      const p = new URLSearchParams();
      for (const k of ["bucket", "subset", "source", "tag", "q"]) if (state[k] !== "") p.set(k, state[k]);
      if (state.rejected) p.set("rejected", "1");
      if (state.page) p.set("page", String(state.page + 1));
      const hash = p.toString();
      if (location.hash.slice(1) !== hash) {
        setStatus("loading…", null, false);  // at once: the hashchange that shows the new state comes later
        location.hash = hash;
      } else {
        show(state);
      }
    }

    function fromInputs(page) {
      return {bucket: inputs.bucket.value, subset: inputs.subset.value, source: inputs.source.value,
              tag: inputs.tag.value.trim(), q: inputs.q.value.trim(), rejected: inputs.rejected.checked, page: page || 0};
    }

    function toInputs(state) {
      for (const k of ["bucket", "subset", "source", "tag", "q"]) if (inputs[k].value !== state[k]) inputs[k].value = state[k];
      inputs.rejected.checked = state.rejected;
      for (const k of ["bucket", "subset", "source", "tag"]) inputs[k].disabled = state.rejected;
    }

    function setStatus(text, total, done) {
      status.textContent = text;
      status.dataset.total = total === null ? "" : String(total);
      status.dataset.done = done ? "1" : "0";
    }

    function pager(state, total, done) {
      prev.disabled = state.page === 0;
      next.disabled = done && (state.page + 1) * PAGE >= total;
    }

    /* Render one page of records; `refs` are [chunk, row] pairs resolved through the cache. */
    function render(records, kind, my) {
      if (my !== generation) return;
      grid.replaceChildren(...records.map(kind === "rejects" ? rejectCard : itemCard));
    }

    async function show(state) {
      const my = ++generation;
      // What the status will describe (a test, or a script, waits for done with this hash).
      status.dataset.hash = location.hash.slice(1);
      setStatus("loading…", null, false);
      toInputs(state);
      const filtered = state.bucket !== "" || state.subset !== "" || state.source !== "" || state.tag !== "" || state.q !== "";
      try {
        if (state.rejected) await scan(state, my, "rejects", summary.reject_chunks, summary.rejected, rejectMatches(state));
        else if (!filtered) await plainPage(state, my);
        else await scan(state, my, "items", summary.chunks, null, await itemMatches(state));
      } catch (e) {
        if (my === generation) S.fail(e);
      }
    }

    async function plainPage(state, my) {
      const total = summary.items, from = state.page * PAGE, to = Math.min(total, from + PAGE);
      const records = [];
      for (let c = Math.floor(from / summary.chunk); c * summary.chunk < to; c++) {
        const rows = await chunk("items", c);
        if (my !== generation) return;
        for (let i = 0; i < rows.length; i++) {
          const index = c * summary.chunk + i;
          if (index >= from && index < to) records.push(rows[i]);
        }
      }
      render(records, "items", my);
      setStatus(total ? "items " + S.int(from + 1) + "–" + S.int(to) + " of " + S.int(total) : "no items", total, true);
      pager(state, total, true);
    }

    /* Chunks in order; the page's records are kept as they are found, the rest only counted. */
    async function scan(state, my, kind, chunks, knownTotal, m) {
      const from = state.page * PAGE, to = from + PAGE;
      const page = [];
      let found = 0, shown = false;
      grid.replaceChildren();
      const order = m.chunks || Array.from({length: chunks}, function (_, i) { return i; });
      setStatus("searching…", null, false);
      for (let n = 0; n < order.length; n++) {
        const rows = await chunk(kind, order[n]);
        if (my !== generation) return;
        for (const r of rows) {
          if (!m.test(r)) continue;
          if (found >= from && found < to) page.push(r);
          found++;
        }
        if (!shown && found >= to) {
          render(page, kind, my);
          shown = true;
        }
        if (shown) {
          setStatus("items " + S.int(from + 1) + "–" + S.int(to) + " of " + S.int(found) + "+ (searching " +
                    (n + 1) + " of " + order.length + " chunks)", null, false);
          pager(state, found, false);
        }
      }
      if (!shown) render(page, kind, my);
      const last = Math.min(found, to);
      const what = kind === "rejects" ? "rejected files " : "items ";
      setStatus(found ? what + S.int(Math.min(from + 1, found)) + "–" + S.int(last) + " of " + S.int(found) +
                (knownTotal !== null && knownTotal !== found ? " (of " + S.int(knownTotal) + ")" : "")
                : "nothing matches", found, true);
      pager(state, found, true);
    }

    function splitTags(caption) {
      return caption.split(summary.separator).map(function (t) { return t.trim(); }).filter(Boolean);
    }

    async function itemMatches(state) {
      const f = await loadFacets();
      const lists = [];
      const b = state.bucket === "" ? null : +state.bucket, s = state.subset === "" ? null : +state.subset;
      const o = state.source === "" ? null : +state.source, t = state.tag, q = state.q.toLowerCase();
      if (b !== null) lists.push(f.bucket[b] || []);
      if (s !== null) lists.push(f.subset[s] || []);
      if (o !== null) lists.push(f.source[o] || []);
      if (t && f.tags[t]) lists.push(f.tags[t]);
      let chunks = null;
      for (const list of lists) {
        const keep = new Set(list);
        chunks = (chunks || list).filter(function (c) { return keep.has(c); });
      }
      return {chunks: chunks, test: function (r) {
        if (b !== null && r[F.bucket] !== b) return false;
        if (s !== null && r[F.subset] !== s) return false;
        if (o !== null && r[F.source] !== o) return false;
        if (t && splitTags(r[F.caption]).indexOf(t) < 0) return false;
        if (q && r[F.caption].toLowerCase().indexOf(q) < 0 &&
            !r[F.variants].some(function (v) { return v.toLowerCase().indexOf(q) >= 0; })) return false;
        return true;
      }};
    }

    function rejectMatches(state) {
      const q = state.q.toLowerCase();
      return {chunks: null, test: function (r) {
        return !q || r[R.path].toLowerCase().indexOf(q) >= 0 || r[R.reason].toLowerCase().indexOf(q) >= 0;
      }};
    }

    function thumb(key, w, h, crop) {
      const cell = el("div", {class: "cell"});
      if (!key) {
        cell.appendChild(el("div", {class: "missing", text: "no image"}));
        return cell;
      }
      // The frame has the image's aspect inside a 200 px square, so the crop box lines up with the pixels.
      const side = 200, scale = side / Math.max(w, h);
      const frame = el("div", {class: "frame", style: "width:" + Math.round(w * scale) + "px;height:" + Math.round(h * scale) + "px"});
      const img = el("img", {src: "thumbs/" + key.slice(0, 2) + "/" + key + ".jpg", alt: "", loading: "lazy", decoding: "async"});
      img.addEventListener("error", function () {
        cell.replaceChildren(el("div", {class: "missing", text: "no thumbnail (the image could not be read)"}));
      });
      frame.appendChild(img);
      if (crop) frame.appendChild(el("div", {class: "crop", title: "the bucket's crop: what training sees",
        style: "left:" + crop[0] + "%;top:" + crop[1] + "%;width:" + crop[2] + "%;height:" + crop[3] + "%"}));
      cell.appendChild(frame);
      return cell;
    }

    function itemCard(r) {
      const bucket = summary.buckets[r[F.bucket]];
      const rw = r[F.resize_w], rh = r[F.resize_h];
      const cuts = bucket[0] < rw || bucket[1] < rh;
      const crop = cuts ? [100 * r[F.crop_left] / rw, 100 * r[F.crop_top] / rh, 100 * bucket[0] / rw, 100 * bucket[1] / rh]
        .map(function (x) { return x.toFixed(2); }) : null;
      const tags = splitTags(r[F.caption]);
      const variants = r[F.variants];
      return el("figure", {class: "card", "data-key": r[F.key]},
        thumb(r[F.thumb], r[F.width], r[F.height], crop),
        el("figcaption", null,
          el("div", {class: "badges"},
            el("span", {class: "badge", title: "bucket (width × height)", text: bucket[0] + "×" + bucket[1]}),
            el("span", {class: "badge", title: "original size", text: r[F.width] + "×" + r[F.height]}),
            r[F.repeats] !== 1 ? el("span", {class: "badge", title: "repeats per epoch", text: "×" + r[F.repeats]}) : null,
            cuts ? el("span", {class: "badge crop", title: "the crop cuts " + (rw - bucket[0]) + "×" + (rh - bucket[1]) +
                               " px of the resized " + rw + "×" + rh, text: "crop"}) : null,
            summary.flip ? el("span", {class: "badge flip", title: "a flipped latent is cached too", text: "flip"}) : null,
            r[F.is_reg] ? el("span", {class: "badge reg", title: "regularisation image", text: "reg"}) : null,
            r[F.held_out] ? el("span", {class: "badge held", title: "held out of training: the validation loss is measured on it",
                                        text: "validation"}) : null),
          el("p", {class: "caption", "data-k": "caption", text: r[F.caption] || "(empty caption)"}),
          variants.length ? el("details", null, el("summary", {text: variants.length + " caption variant" + (variants.length > 1 ? "s" : "")}),
            el("ul", null, variants.map(function (v) { return el("li", {text: v}); }))) : null,
          tags.length > 1 ? el("div", {class: "chips"}, tags.map(function (t) {
            return el("a", {class: "chip", href: "#tag=" + encodeURIComponent(t), text: t});
          })) : null,
          el("div", {class: "where", title: "caption from: " + r[F.caption_from]},
            summary.subsets[r[F.subset]] + " · " + r[F.path])));
    }

    function rejectCard(r) {
      return el("figure", {class: "card rejected"},
        thumb(r[R.thumb], 1, 1, null),
        el("figcaption", null,
          el("div", {class: "badges"}, el("span", {class: "badge bad", text: r[R.duplicate_of] ? "duplicate" : "rejected"})),
          el("p", {class: "reason", "data-k": "reason", text: r[R.reason]}),
          el("div", {class: "where", text: r[R.path]})));
    }

    function start() {
      for (const k of ["bucket", "subset", "source", "rejected"]) {
        inputs[k].addEventListener("change", function () { writeState(fromInputs(0)); });
      }
      for (const k of ["tag", "q"]) {
        inputs[k].addEventListener("input", function () {
          clearTimeout(typing);
          typing = setTimeout(function () { writeState(fromInputs(0)); }, 300);
        });
      }
      inputs.tag.addEventListener("focus", function () { loadFacets().catch(S.fail); });
      document.getElementById("filters").addEventListener("submit", function (e) { e.preventDefault(); writeState(fromInputs(0)); });
      document.getElementById("f-clear").addEventListener("click", function () { location.hash = ""; });
      prev.addEventListener("click", function () { const s = readState(); s.page = Math.max(0, s.page - 1); writeState(s); });
      next.addEventListener("click", function () { const s = readState(); s.page += 1; writeState(s); });
      window.addEventListener("hashchange", function () {
        show(readState());
        // A tag, bucket or subset link higher up, or a page turn: the gallery's top is what to see next.
        const top = document.getElementById("gallery").getBoundingClientRect().top;
        if (top < 0 || top > window.innerHeight) document.getElementById("gallery").scrollIntoView();
      });
      show(readState());
    }

    return {start: start};
  }
})();

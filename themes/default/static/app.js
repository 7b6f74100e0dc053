// sitegen: progressive enhancement only; every page reads fine without this file.
(function () {
  "use strict";
  // Terms in one token search (tokenstore.MAX_TERMS, the edge function's MAX_TERMS), so a shared
  // link cannot ask for thousands. Set here: the page code below runs before the rest of this file.
  var MAX_TERMS = 16;
  var root = document.documentElement;
  var saved = null;
  try { saved = localStorage.getItem("theme"); } catch (e) { /* storage may be off */ }
  if (saved) root.setAttribute("data-theme", saved);

  function ready(fn) { if (document.readyState !== "loading") fn(); else document.addEventListener("DOMContentLoaded", fn); }

  ready(function () {
    var body = document.body;
    var theme = document.getElementById("theme");
    if (theme) {
      theme.hidden = false;
      theme.addEventListener("click", function () {
        var dark = root.getAttribute("data-theme") === "dark" ||
          (!root.getAttribute("data-theme") && window.matchMedia("(prefers-color-scheme: dark)").matches);
        var next = dark ? "light" : "dark";
        root.setAttribute("data-theme", next);
        try { localStorage.setItem("theme", next); } catch (e) { /* ignore */ }
      });
    }
    var model = body.getAttribute("data-model");
    var layers = +body.getAttribute("data-layers"), size = +body.getAttribute("data-size");
    function neuronUrl(l, n) { return "/" + model + "/" + l + "/" + n + ".html"; }
    var random = document.getElementById("random");
    if (random && model && layers && size) {
      random.addEventListener("click", function (ev) {
        ev.preventDefault();
        location.href = neuronUrl(Math.floor(Math.random() * layers), Math.floor(Math.random() * size));
      });
    }
    var chooser = document.getElementById("chooser");
    if (chooser) {
      chooser.addEventListener("submit", function (ev) {
        ev.preventDefault();
        location.href = neuronUrl(chooser.layer.value, chooser.neuron.value);
      });
    }
    setupTable(document.getElementById("layer-table"));
    setupTokens(body.getAttribute("data-json"));
    if (body.getAttribute("data-page") === "search") setupSearch();
  });

  function setupTable(table) {
    if (!table) return;
    var tbody = table.tBodies[0];
    table.querySelectorAll("th button").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var key = +btn.getAttribute("data-key"), text = btn.hasAttribute("data-text");
        var th = btn.parentNode, asc = th.getAttribute("aria-sort") !== "ascending";
        table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var rows = Array.prototype.slice.call(tbody.rows);
        rows.sort(function (a, b) {
          var x = a.cells[key], y = b.cells[key], r;
          if (text) r = x.textContent.localeCompare(y.textContent);
          else r = parseFloat(x.getAttribute("data-v")) - parseFloat(y.getAttribute("data-v"));
          if (r === 0) r = +a.cells[0].getAttribute("data-v") - +b.cells[0].getAttribute("data-v");
          return asc ? r : -r;
        });
        rows.forEach(function (r) { tbody.appendChild(r); });
      });
    });
  }

  // Percentile of a value from the neuron's quantile table (linear between stored levels).
  var LEVELS = [0.0001, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 0.9995, 0.9999];
  function percentile(v, q) {
    if (!q.length) return null;
    if (v <= q[0]) return LEVELS[0];
    for (var i = 1; i < q.length; i++) {
      if (v <= q[i]) {
        var span = q[i] - q[i - 1];
        return LEVELS[i - 1] + (span > 0 ? (v - q[i - 1]) / span : 0) * (LEVELS[i] - LEVELS[i - 1]);
      }
    }
    return 1;
  }
  function fmtPct(p) { return p === null ? "" : p >= 0.9999 ? ">99.99th" : (100 * p).toFixed(p > 0.99 ? 2 : 1) + "th"; }

  // Positions before this (the BOS token) are greyed and not counted; the page says how many.
  function firstValid() { return +(document.body.getAttribute("data-fv") || 0); }
  function setupTokens(jsonUrl) {
    var tip = document.getElementById("tip");
    if (!tip) return;
    var dataPromise = null;
    function data() { if (!dataPromise) dataPromise = fetch(jsonUrl).then(function (r) { return r.json(); }); return dataPromise; }

    // Exact values come from the neuron's JSON (fetched once, on the first hover or focus).
    function activationAt(seq, idx) {
      var section = seq.closest(".seqs");
      var i = Array.prototype.indexOf.call(section.querySelectorAll(".seq"), seq);
      return data().then(function (d) {
        return textOf(d, section, i).activations[+seq.getAttribute("data-start") + idx];
      });
    }
    function show(seq, tok) {
      var toks = seq.querySelectorAll("i");
      var idx = Array.prototype.indexOf.call(toks, tok);
      var q = seq.closest(".seqs").getAttribute("data-q").split(",").map(Number);  // quantile values
      toks.forEach(function (t) { t.classList.remove("cur"); });
      tok.classList.add("cur");
      seq.setAttribute("data-cur", idx);
      activationAt(seq, idx).then(function (v) {
        if (!tok.classList.contains("cur")) return;  // the pointer moved on meanwhile
        tip.textContent = JSON.stringify(tok.textContent) + "  activation " + String(Number(v.toPrecision(4))) + "  · " + fmtPct(percentile(v, q)) + " percentile";
        tip.hidden = false;
        var r = tok.getBoundingClientRect();
        tip.style.left = Math.max(4, Math.min(window.innerWidth - tip.offsetWidth - 4, r.left)) + "px";
        tip.style.top = (r.bottom + 6 + tip.offsetHeight > window.innerHeight ? r.top - tip.offsetHeight - 6 : r.bottom + 6) + "px";
      });
    }
    function hide(seq) { tip.hidden = true; if (seq) seq.querySelectorAll("i.cur").forEach(function (t) { t.classList.remove("cur"); }); }

    document.querySelectorAll(".seq").forEach(function (seq) {
      seq.addEventListener("mouseover", function (ev) { if (ev.target.tagName === "I") show(seq, ev.target); });
      seq.addEventListener("mouseleave", function () { hide(seq); });
      seq.addEventListener("focus", function () {
        // start at the peak token: the one whose colour class is strongest
        var toks = seq.querySelectorAll("i"), best = 0, bestLevel = -1;
        toks.forEach(function (t, i) { var m = /[pn](\d)/.exec(t.className || ""); var lvl = m ? +m[1] : 0; if (lvl > bestLevel) { bestLevel = lvl; best = i; } });
        if (toks[best]) show(seq, toks[best]);
      });
      seq.addEventListener("blur", function () { hide(seq); });
      seq.addEventListener("keydown", function (ev) {
        if (ev.key !== "ArrowRight" && ev.key !== "ArrowLeft") return;
        ev.preventDefault();
        var toks = seq.querySelectorAll("i"), cur = +(seq.getAttribute("data-cur") || 0);
        var next = Math.max(0, Math.min(toks.length - 1, cur + (ev.key === "ArrowRight" ? 1 : -1)));
        show(seq, toks[next]);
      });
    });
    // A cut sequence gets a button that swaps in every token of it, from the neuron's JSON.
    // A text's JSON: the top or most negative texts by index, an interval group's by its group and index.
    function textOf(d, section, i) {
      var kind = section.getAttribute("data-kind");
      if (kind === "interval") return d.data.interval_examples[+section.getAttribute("data-group")].texts[i];
      return d.data[kind === "top" ? "texts" : "bottom_texts"][i];
    }
    document.querySelectorAll(".seqs").forEach(function (section) {
      var kind = section.getAttribute("data-kind");
      section.querySelectorAll(".seq").forEach(function (seq, i) {
        if (!seq.querySelector(".ell")) return;
        var btn = document.createElement("button");
        btn.type = "button"; btn.className = "whole"; btn.textContent = "Show whole sequence";
        seq.parentNode.querySelector("details").appendChild(btn);
        btn.addEventListener("click", function () { showWhole(seq, kind, section, i, btn); });
      });
    });
    function showWhole(seq, kind, section, i, btn) {
      data().then(function (d) {
        var text = textOf(d, section, i);
        // the page's scales: top texts on the largest |activation|, the most negative texts on |min|
        var scale = (kind !== "bottom" ? Math.max(Math.abs(d.data.stats.max), Math.abs(d.data.stats.min)) : Math.abs(d.data.stats.min)) || 1;
        seq.textContent = "";
        text.tokens.forEach(function (tok, j) {
          var el = document.createElement("i"), a = text.activations[j];
          var b = Math.max(-9, Math.min(9, Math.round(9 * a / scale)));
          if (j < firstValid()) el.className = "bos"; else if (b > 0) el.className = "p" + b; else if (b < 0) el.className = "n" + (-b);
          if (j === text.max_activating_token_index && j >= firstValid()) el.classList.add("x");
          el.textContent = tok.replace(/\n/g, "\u21b5");
          seq.appendChild(el);
        });
        seq.setAttribute("data-start", "0");
        btn.remove();
      });
    }
  }

  // ---- the API page's examples: the site's own address where the build was given no --base-url ----
  if (/^https?:$/.test(location.protocol)) {
    document.querySelectorAll("pre code, p code").forEach(function (el) {
      if (el.textContent.indexOf("https://<your-site>") >= 0) el.textContent = el.textContent.split("https://<your-site>").join(location.origin);
    });
  }

  // ---- token search over the static shards (sitegen/site/search.py writes them) ----
  // Neuron2Graph's normalisation, as sitegen.services.neuron2graph.graph.normalise.
  function isCased(c) { return c.toLowerCase() !== c.toUpperCase(); }
  function isTitle(t) {  // Python's str.istitle()
    var prevCased = false, any = false;
    for (var ch of t) {
      if (isCased(ch)) {
        var upper = ch === ch.toUpperCase();
        if (upper === prevCased) return false;  // upper after cased, or lower after uncased
        prevCased = true; any = true;
      } else prevCased = false;
    }
    return any;
  }
  function normalise(t) {
    var n = Array.from(t).length;
    if (n > 1 && isTitle(t)) t = t.toLowerCase();
    if (n > 1 && /\p{L}/u.test(t)) t = t.trim();
    return t;
  }
  // At most MAX_TERMS terms as written, repeats kept once: the search URL's own rule.
  function parseQuery(q) {
    var terms = [], seen = new Set();
    var parts = q.split(",");
    if (parts.length > MAX_TERMS) throw new Error("Too many terms (" + parts.length + "): ask for at most " + MAX_TERMS + ", e.g. any:the,activating:of");
    for (var i = 0; i < parts.length; i++) {
      var raw = parts[i];
      if (!raw.trim()) throw new Error("Empty term in “" + q + "”: write type:token, e.g. any:the");
      // two terms with a space, not a comma, between them (tokenstore._JOINED); a token may start with a space
      if (/[^ \t\r\n][ \t\r\n]+(?:any|activating|important):/.test(raw.replace(/[A-Z]/g, function (c) { return c.toLowerCase(); })))
        throw new Error("Two terms in “" + raw + "” with no comma between them: join terms with commas, e.g. any:the,any:of");
      var at = raw.indexOf(":"), kind = "any", token = raw;
      if (at >= 0) { kind = raw.slice(0, at).trim().toLowerCase(); token = raw.slice(at + 1); }
      if (["any", "activating", "important"].indexOf(kind) < 0) throw new Error("Unknown type “" + kind + "” in “" + raw + "”: use any, activating or important, e.g. any:the");
      if (token === "") throw new Error("No token after “" + kind + ":”: write " + kind + ":token");
      var term = [kind, normalise(token)], key = JSON.stringify(term);
      if (!seen.has(key)) { seen.add(key); terms.push(term); }
    }
    return terms;
  }
  function fnv1a(text) {
    var h = 0x811c9dc5, bytes = new TextEncoder().encode(text);
    for (var i = 0; i < bytes.length; i++) { h ^= bytes[i]; h = Math.imul(h, 0x01000193) >>> 0; }
    return h >>> 0;
  }
  function undelta(d) { var out = [], x = 0; for (var i = 0; i < d.length; i++) { x += d[i]; out.push(x); } return out; }
  function getJSON(url) { return fetch(url).then(function (r) { if (!r.ok) throw new Error(url + ": HTTP " + r.status); return r.json(); }); }
  // getJSON for one search: each file fetched once, however many terms read it
  function fetchOnce() { var seen = {}; return function (url) { return seen[url] || (seen[url] = getJSON(url)); }; }
  function union(a, b) { var s = new Set(a); b.forEach(function (x) { s.add(x); }); return Array.from(s).sort(function (x, y) { return x - y; }); }

  function setupSearch() {
    var params = new URLSearchParams(location.search);
    var form = document.getElementById("search-form"), sel = document.getElementById("search-model"), input = document.getElementById("search-q");
    var errorEl = document.getElementById("search-error"), status = document.getElementById("search-status");
    var list = document.getElementById("search-results"), moreBtn = document.getElementById("search-more");
    if (params.get("model")) sel.value = params.get("model");
    if (params.get("q") !== null) input.value = params.get("q");
    var within = document.getElementById("search-in");
    if (params.get("in") && within) within.value = params.get("in");
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      history.replaceState(null, "", "/search.html?model=" + encodeURIComponent(sel.value) + "&q=" + encodeURIComponent(input.value) +
        (within && within.value === "explanations" ? "&in=explanations" : ""));
      go();
    });
    if (input.value) go();
    function go() { if (within && within.value === "explanations") runText(sel.value, input.value); else run(sel.value, input.value); }

    // Explanation search: lunr's analysis of the query, one shard per term, AND, ranked by tf-idf.
    function runText(model, q) {
      errorEl.hidden = true; list.textContent = ""; moreBtn.hidden = true; status.textContent = "Searching\u2026";
      var base = "/search/" + model + "/";
      getJSON(base + "meta.json").then(function (meta) {
        if (!meta.text) { status.textContent = "This model has no explanations to search."; return; }
        var terms = analyse(q, meta.text.stop_words).filter(function (t, k, all) { return all.indexOf(t) === k; }), get = fetchOnce();
        if (terms.length > MAX_TERMS) { status.textContent = ""; errorEl.textContent = "Too many words (" + terms.length + "): ask for at most " + MAX_TERMS + "."; errorEl.hidden = false; return; }
        if (!terms.length) { status.textContent = ""; errorEl.textContent = "Nothing to search for: every word of \u201c" + q + "\u201d is a stop word."; errorEl.hidden = false; return; }
        return Promise.all(terms.map(function (t) {
          return get(base + "words/" + (fnv1a(t) % meta.text.shards) + ".json").then(function (body) {
            return Object.prototype.hasOwnProperty.call(body, t) ? body[t] : [[], []];
          });
        })).then(function (found) {
          var scores = null;
          found.forEach(function (entry) {
            var ids = undelta(entry[0]), idf = Math.log(1 + meta.text.documents / Math.max(ids.length, 1)), here = {};
            ids.forEach(function (id, k) { here[id] = idf * (1 + Math.log(entry[1][k])); });
            if (scores === null) scores = here;
            else { var next = {}; Object.keys(scores).forEach(function (id) { if (id in here) next[id] = scores[id] + here[id]; }); scores = next; }
          });
          var ids = Object.keys(scores).map(Number).sort(function (a, b) { return scores[b] - scores[a] || a - b; });
          var what = "explanations with " + terms.map(function (t) { return JSON.stringify(t); }).join(" AND ");
          if (!ids.length) { status.textContent = "No " + what + "."; return; }
          status.textContent = ids.length + " neuron" + (ids.length === 1 ? "" : "s") + " whose " + what + " (stems), best match first.";
          render(model, meta, ids, function (id) { return "score " + scores[id].toFixed(2); });
        });
      }).catch(function (e) { status.textContent = ""; errorEl.textContent = "Search failed: " + e.message; errorEl.hidden = false; });
    }

    function run(model, q) {
      errorEl.hidden = true; list.textContent = ""; moreBtn.hidden = true; status.textContent = "";
      var terms;
      try { terms = parseQuery(q); } catch (e) { errorEl.textContent = e.message; errorEl.hidden = false; return; }
      var base = "/search/" + model + "/", get = fetchOnce();
      status.textContent = "Searching…";
      getJSON(base + "meta.json").then(function (meta) {
        return Promise.all(terms.map(function (t) {
          var shard = fnv1a(t[1]) % meta.shards;
          return get(base + "tokens/" + shard + ".json").then(function (body) {
            return {kind: t[0], token: t[1], shard: shard, entry: Object.prototype.hasOwnProperty.call(body, t[1]) ? body[t[1]] : null};
          });
        })).then(function (found) {
          // ranking and AND need every list whole (a capped token's rest comes from its "more" file)
          return Promise.all(found.map(function (f) { return lists(base, f, true, get); })).then(function (sets) {
            var ids = sets.reduce(function (acc, s) { if (acc === null) return s.ids; var keep = new Set(s.ids); return acc.filter(function (x) { return keep.has(x); }); }, null);
            show(model, meta, ids, found, sets);
          });
        });
      }).catch(function (e) { status.textContent = ""; errorEl.textContent = "Search failed: " + e.message; errorEl.hidden = false; });
    }
    function pick(kind, a, i) { return kind === "activating" ? a : kind === "important" ? i : union(a, i); }
    // support: neuron id -> in how many distinct sequences it fires on the token ("s", aligned with
    // "a"); strength: how strongly it fires on it ("w", aligned with "a"), what results are ranked by
    function supportOf(a, s) { var m = new Map(); a.forEach(function (id, k) { if (k < s.length) m.set(id, s[k]); }); return m; }
    function lists(base, f, full, get) {
      if (!f.entry) return Promise.resolve({ids: [], capped: false, total: 0, support: new Map(), strength: new Map()});
      var e = f.entry, a = undelta(e.a), i = undelta(e.i);
      // exact sizes: "n" is the size of the union any: finds
      var total = f.kind === "activating" ? e.na : f.kind === "important" ? e.ni : e.n;
      var capped = (f.kind !== "important" && e.na > a.length) || (f.kind !== "activating" && e.ni > i.length);
      if (!capped || !full) return Promise.resolve({ids: pick(f.kind, a, i), capped: capped, total: total, support: supportOf(a, e.s || []), strength: supportOf(a, e.w || [])});
      return Promise.all([get(base + "more/" + f.shard + "-" + e.m + ".json"), get(base + "support/" + f.shard + "-" + e.m + ".json")]).then(function (got) {
        var whole = undelta(got[0].a), ids = pick(f.kind, whole, undelta(got[0].i));
        return {ids: ids, capped: false, total: ids.length, support: supportOf(whole, got[1].s), strength: supportOf(whole, got[1].w || [])};
      });
    }
    function plural(n, word) { return n.toLocaleString("en-US") + " " + word + (n === 1 ? "" : "s"); }
    // what the token counts count: the whole corpus when the store keeps every sequence it read
    function corpusText(c) {
      if (!c) return "the stored sequences";
      var tokens = plural(c.tokens, "token");
      if (c.processed === c.sequences) return "the corpus (" + plural(c.sequences, "sequence") + ", " + tokens + ")";
      return "the " + plural(c.sequences, "stored sequence") + " (" + tokens + (c.processed !== null ? "; the corpus pass read " + plural(c.processed, "sequence") : "") + ")";
    }
    function show(model, meta, ids, found, sets) {
      var SHOWN = meta.cap;  // results drawn at once (as many as a shard lists); "Show all" draws the rest
      list.textContent = ""; moreBtn.hidden = true;
      var what = found.map(function (f) { return f.kind + ":" + JSON.stringify(f.token); }).join(" AND ");
      if (!ids.length) {
        var counts = found.map(function (f) { return JSON.stringify(f.token) + " occurs " + plural(f.entry ? f.entry.c || 0 : 0, "time"); });
        status.textContent = "No neuron has " + what + ". In " + corpusText(meta.corpus) + ", " + counts.join(", ") + ".";
        return;
      }
      // strongest first: a neuron's strength on the query is its weakest over the terms (0 where it
      // holds a token only as an important one); ties by layer and neuron
      var strength = new Map();
      ids.forEach(function (id) { strength.set(id, Math.min.apply(null, sets.map(function (s) { return s.strength.has(id) ? s.strength.get(id) : 0; }))); });
      var ranked = ids.slice().sort(function (x, y) { return strength.get(y) - strength.get(x) || x - y; });
      var total = ranked.length;
      status.textContent = (total > SHOWN ? "Showing " + SHOWN + " of " + total.toLocaleString("en-US") : total.toLocaleString("en-US")) + " neuron" + (total === 1 ? "" : "s") + " with " + what + ", strongest first. Strength: the neuron's largest activation on the token in its top sequences, as a share of its largest there" + (found.length > 1 ? " (the lowest over the terms)" : "") + "; support: the number of those sequences in which it fires on the token.";
      var draw = function (shown) {
        render(model, meta, shown, function (id) { return "strength " + strength.get(id).toFixed(2); }, function (id) {
          var parts = [];
          sets.forEach(function (s, k) {
            if (!s.support.has(id)) return;
            parts.push(plural(s.support.get(id), "sequence") + (found.length > 1 ? " (" + JSON.stringify(found[k].token) + ")" : ""));
          });
          return parts.join(", ");
        });
      };
      draw(ranked.slice(0, SHOWN));
      if (total > SHOWN) {
        moreBtn.hidden = false;
        moreBtn.onclick = function () { draw(ranked); moreBtn.hidden = true; status.textContent = status.textContent.replace("Showing " + SHOWN + " of ", ""); };
      }
    }
    var chunks = {};  // preview files, fetched once per page however often results are redrawn
    var observer = null;
    function render(model, meta, ids, scoreOf, supportText) {
      list.textContent = "";
      if (observer) observer.disconnect();  // the rows it watched are gone
      // previews load as rows come into view: one small file per 32 neurons, each fetched once
      function loadPreview(li) {
        var id = +li.getAttribute("data-id"), layer = Math.floor(id / meta.layer_size), n = id % meta.layer_size, prev = li.querySelector(".preview");
        var key = model + "/preview/" + layer + "/" + Math.floor(n / meta.preview_chunk);
        if (!chunks[key]) chunks[key] = getJSON("/search/" + key + ".json");
        chunks[key].then(function (rows) {
          var r = rows[n % meta.preview_chunk];
          // [top tokens, max, graph F1, explanation, F1's interval, the explanation's scores]
          var f1 = r[2] !== null ? " · graph F1 " + r[2] + (r[4] ? " [" + r[4][0] + ", " + r[4][1] + "]" : "") : "";
          prev.textContent = "  max " + r[1] + f1 + " · " + r[0].map(function (t) { return JSON.stringify(t); }).join(" ");
          if (r[3]) { var ex = document.createElement("q"); ex.className = "expl"; ex.textContent = r[3]; prev.appendChild(ex); }
          if (r[5]) { var sc = document.createElement("span"); sc.className = "expl-scores"; sc.textContent = " (" + r[5] + ")"; prev.appendChild(sc); }
        });
      }
      observer = "IntersectionObserver" in window ? new IntersectionObserver(function (entries) {
        entries.forEach(function (en) { if (en.isIntersecting) { observer.unobserve(en.target); loadPreview(en.target); } });
      }, {rootMargin: "200px"}) : null;
      ids.forEach(function (id, k) {
        var layer = Math.floor(id / meta.layer_size), n = id % meta.layer_size;
        var li = document.createElement("li"), a = document.createElement("a");
        li.setAttribute("data-id", id);
        a.href = "/" + model + "/" + layer + "/" + n + ".html"; a.textContent = layer + ":" + n;
        li.appendChild(a);
        if (scoreOf) { var sc = document.createElement("span"); sc.className = "score"; sc.textContent = " " + scoreOf(id); li.appendChild(sc); }
        var sup = supportText ? supportText(id) : "";
        if (sup) { var sp = document.createElement("span"); sp.className = "support"; sp.textContent = " · " + sup; li.appendChild(sp); }
        var prev = document.createElement("span"); prev.className = "preview"; li.appendChild(prev);
        list.appendChild(li);
        if (observer) observer.observe(li); else if (k < 50) loadPreview(li);
      });
    }
  }

  // ---- lunr's analysis (tokeniser, trimmer, stop words, Porter stemmer), as the build runs it
  // through the lunr package (sitegen/services/neuron_explainer/textindex.py); a test compares both.
  function analyse(text, stopWords) {
    var stop = new Set(stopWords), out = [];
    text.toLowerCase().split(/[\s\-]+/).forEach(function (tok) {
      if (!tok) return;
      var m = /^[^\p{L}\p{N}_]*?([\p{L}\p{N}_]+)[^\p{L}\p{N}_]*?$/u.exec(tok);
      if (m) tok = m[1];
      // words over 64 code points are dropped, as textindex.MAX_WORD_LENGTH drops them from the index
      if (!tok || Array.from(tok).length > 64 || stop.has(tok)) return;
      out.push(porter(tok));
    });
    return out;
  }
  var STEP2 = {ational: "ate", tional: "tion", enci: "ence", anci: "ance", izer: "ize", bli: "ble", alli: "al", entli: "ent", eli: "e", ousli: "ous",
    ization: "ize", ation: "ate", ator: "ate", alism: "al", iveness: "ive", fulness: "ful", ousness: "ous", aliti: "al", iviti: "ive", biliti: "ble", logi: "log"};
  var STEP3 = {icate: "ic", ative: "", alize: "al", iciti: "ic", ical: "ic", ful: "", ness: ""};
  var C = "[^aeiou][^aeiouy]*", V = "[aeiouy][aeiou]*";
  var MGR0 = new RegExp("^(" + C + ")?" + V + C), MEQ1 = new RegExp("^(" + C + ")?" + V + C + "(" + V + ")?$");
  var MGR1 = new RegExp("^(" + C + ")?" + V + C + V + C), SV = new RegExp("^(" + C + ")?[aeiouy]");
  var CVC = /^[^aeiou][^aeiouy]*[aeiouy][^aeiouwxy]$/;
  function porter(w) {
    if (w.length < 3) return w;
    var m, stem, first = w.charAt(0);
    if (first === "y") w = "Y" + w.slice(1);
    if ((m = /^(.+?)(ss|i)es$/.exec(w))) w = m[1] + m[2];
    else if ((m = /^(.+?)([^s])s$/.exec(w))) w = m[1] + m[2];
    if ((m = /^(.+?)eed$/.exec(w))) {
      if (MGR0.test(m[1])) w = w.slice(0, -1);
    } else if ((m = /^(.+?)(ed|ing)$/.exec(w))) {
      stem = m[1];
      if (SV.test(stem)) {
        w = stem;
        if (/(at|bl|iz)$/.test(w)) w += "e";
        else if (/([^aeiouylsz])\1$/.test(w)) w = w.slice(0, -1);
        else if (CVC.test(w)) w += "e";
      }
    }
    if ((m = /^(.+?)y$/.exec(w)) && SV.test(m[1])) w = m[1] + "i";
    if ((m = /^(.+?)(ational|tional|enci|anci|izer|bli|alli|entli|eli|ousli|ization|ation|ator|alism|iveness|fulness|ousness|aliti|iviti|biliti|logi)$/.exec(w)) && MGR0.test(m[1])) w = m[1] + STEP2[m[2]];
    if ((m = /^(.+?)(icate|ative|alize|iciti|ical|ful|ness)$/.exec(w)) && MGR0.test(m[1])) w = m[1] + STEP3[m[2]];
    if ((m = /^(.+?)(al|ance|ence|er|ic|able|ible|ant|ement|ment|ent|ou|ism|ate|iti|ous|ive|ize)$/.exec(w))) {
      if (MGR1.test(m[1])) w = m[1];
    } else if ((m = /^(.+?)(s|t)(ion)$/.exec(w))) {
      stem = m[1] + m[2];
      if (MGR1.test(stem)) w = stem;
    }
    if ((m = /^(.+?)e$/.exec(w))) {
      stem = m[1];
      if (MGR1.test(stem) || (MEQ1.test(stem) && !CVC.test(stem))) w = stem;
    }
    if (/ll$/.test(w) && MGR1.test(w)) w = w.slice(0, -1);
    if (first === "y") w = "y" + w.slice(1);
    return w;
  }
  window.sitegenAnalyse = analyse;  // for the test that compares it with the Python pipeline
})();

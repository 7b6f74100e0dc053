// sitegen: progressive enhancement only; every page reads fine without this file.
(function () {
  "use strict";
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
      var section = seq.closest(".seqs"), kind = section.getAttribute("data-kind");
      var i = Array.prototype.indexOf.call(section.querySelectorAll(".seq"), seq);
      return data().then(function (d) {
        var text = d.data[kind === "top" ? "texts" : "bottom_texts"][i];
        return text.activations[+seq.getAttribute("data-start") + idx];
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
    document.querySelectorAll(".seqs").forEach(function (section) {
      var kind = section.getAttribute("data-kind");
      section.querySelectorAll(".seq").forEach(function (seq, i) {
        if (!seq.querySelector(".ell")) return;
        var btn = document.createElement("button");
        btn.type = "button"; btn.className = "whole"; btn.textContent = "Show whole sequence";
        seq.parentNode.querySelector("details").appendChild(btn);
        btn.addEventListener("click", function () { showWhole(seq, kind, i, btn); });
      });
    });
    function showWhole(seq, kind, i, btn) {
      data().then(function (d) {
        var text = d.data[kind === "top" ? "texts" : "bottom_texts"][i];
        var scale = Math.max(Math.abs(d.data.stats.max), Math.abs(d.data.stats.min)) || 1;
        seq.textContent = "";
        text.tokens.forEach(function (tok, j) {
          var el = document.createElement("i"), a = text.activations[j];
          var b = Math.max(-9, Math.min(9, Math.round(9 * a / scale)));
          if (j < firstValid()) el.className = "bos"; else if (b > 0) el.className = "p" + b; else if (b < 0) el.className = "n" + (-b);
          el.textContent = tok.replace(/\n/g, "\u21b5");
          seq.appendChild(el);
        });
        seq.setAttribute("data-start", "0");
        btn.remove();
      });
    }
  }
})();

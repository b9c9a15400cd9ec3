// The feature browser. Every string from the data is inserted with textContent, never as HTML.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Math.abs(x) >= 1e-3 || x === 0 ? Number(x).toPrecision(digits) : Number(x).toExponential(1);
}

function visible(token) { return token.replace(/\n/g, "⏎").replace(/\t/g, "⇥"); }

// One token per activation; colour is the activation relative to `scale`.
function renderTokens(strings, acts, scale, centre) {
  const line = el("span");
  strings.forEach((token, i) => {
    if (token === null) return;
    const a = acts[i], alpha = scale > 0 ? Math.max(0, Math.min(1, a / scale)) : 0;
    const span = el("span", {class: "tok" + (i === centre ? " centre" : ""), title: fmt(a)}, visible(token));
    if (alpha > 0) span.style.background = `rgba(255, 90, 0, ${alpha.toFixed(2)})`;
    line.append(span);
  });
  return line;
}

// --- index page: sortable table of units -------------------------------------------------------
function renderIndex(data) {
  const root = document.getElementById("app"), pageSize = 200;
  let rows = data.rows.slice(), sortColumn = "density", descending = true, shown = pageSize;
  const table = el("table", {id: "units"}), body = el("tbody"), head = el("tr");
  const more = el("button", {id: "more"}, "show more");
  data.columns.forEach((column, c) => {
    const th = el("th", {"data-column": column.key, title: column.title || ""}, column.label);
    th.addEventListener("click", () => {
      descending = sortColumn === column.key ? !descending : column.key !== "unit";
      sortColumn = column.key; shown = pageSize; sortRows(); draw();
    });
    head.append(th);
  });
  table.append(el("thead", {}, head), body);
  function sortRows() {
    const c = data.columns.findIndex(col => col.key === sortColumn), sign = descending ? -1 : 1;
    const key = r => (r[c] === null || Number.isNaN(r[c]) ? Infinity * sign : r[c]);  // missing values last
    rows.sort((a, b) => (key(a) < key(b) ? -sign : key(a) > key(b) ? sign : a[0] - b[0]));
  }
  function draw() {
    body.replaceChildren(...rows.slice(0, shown).map(row => el("tr", {},
      ...row.map((value, c) => {
        const column = data.columns[c];
        if (c === 0) return el("td", {}, el("a", {href: `unit.html#${value}`}, String(value)));
        return el("td", {class: column.text ? "text" : ""}, column.text ? (value ?? "") : fmt(value));
      }))));
    for (const th of head.children) th.classList.toggle("sorted", th.dataset.column === sortColumn);
    more.hidden = shown >= rows.length;
  }
  more.addEventListener("click", () => { shown += pageSize; draw(); });
  root.append(el("p", {class: "muted"}, `${data.rows.length} units; click a column to sort.`), table, more);
  sortRows(); draw();
  document.body.dataset.readyMs = performance.now().toFixed(0);  // read by benchmarks/bench_features.py
  document.body.dataset.ready = "1";
}

// --- unit page: loads the chunk holding the unit ---------------------------------------------
function loadUnit() {
  const unit = parseInt(location.hash.slice(1) || "0", 10);
  const meta = window.MONOSCOPE_META;
  if (!(unit >= 0 && unit < meta.d_sae)) { document.getElementById("app").textContent = "no such unit"; return; }
  window.MONOSCOPE_CHUNK = chunk => renderUnit(unit, chunk.units[unit - chunk.first], meta);
  const script = el("script", {src: `data/chunk_${Math.floor(unit / meta.chunk_size)}.js`});
  document.head.append(script);
}

function exampleLine(example, meta, vocab) {
  const strings = example.tokens.map(t => (t < 0 ? null : vocab[t]));
  const acts = example.acts.map(q => (q * example.scale) / 255);
  return el("div", {class: "example"}, el("span", {class: "value"}, fmt(example.value)),
    renderTokens(strings, acts, example.scale, meta.context_tokens));
}

function tokenTable(ids, values, vocab, title) {
  return el("table", {}, el("tr", {}, el("th", {colspan: 2}, title)),
    ...ids.map((t, i) => el("tr", {}, el("td", {class: "text"}, visible(vocab[t])), el("td", {}, fmt(values[i])))));
}

function renderUnit(unit, data, meta) {
  const vocab = window.MONOSCOPE_VOCAB, root = document.getElementById("app");
  document.title = `${meta.name} ${meta.kind} ${unit}`;
  const nav = el("p", {class: "nav"}, el("a", {href: "index.html"}, `↑ ${meta.name}`),
    el("a", {href: `#${Math.max(0, unit - 1)}`}, "← prev"), el("a", {href: `#${Math.min(meta.d_sae - 1, unit + 1)}`}, "next →"));
  const facts = el("table", {id: "facts"});
  for (const [label, value] of data.facts) facts.append(el("tr", {}, el("th", {}, label), el("td", {class: "text"}, typeof value === "number" ? fmt(value) : value)));
  const parts = [nav, el("h1", {}, `${meta.name} · ${meta.kind} ${unit}`), facts];
  if (data.explanation) parts.push(el("p", {id: "explanation"}, "Explanation: ", el("q", {}, data.explanation)));
  const hist = el("div", {class: "hist", id: "histogram"}), peak = Math.max(1, ...data.histogram);
  data.histogram.forEach((count, b) => hist.append(el("div", {title: `${fmt(data.upper * b / data.histogram.length)}–${fmt(data.upper * (b + 1) / data.histogram.length)}: ${count}`, style: `height:${(80 * Math.log1p(count) / Math.log1p(peak)).toFixed(1)}px`})));
  parts.push(el("h2", {}, "Activation histogram (active tokens, log count)"), hist,
    el("p", {class: "muted"}, `0 … ${fmt(data.upper)}`));
  const side = el("div", {class: "cols"});
  if (data.logits) {
    side.append(tokenTable(data.logits.top_ids, data.logits.top_values, vocab, "Top logit weights"),
      tokenTable(data.logits.bottom_ids, data.logits.bottom_values, vocab, "Bottom logit weights"));
  }
  for (const group of data.links) {
    side.append(el("table", {class: "links"}, el("tr", {}, el("th", {colspan: 2}, group.title)),
      ...group.items.map(([href, label, weight]) => el("tr", {}, el("td", {class: "text"}, el("a", {href}, label)), el("td", {}, fmt(weight))))));
  }
  if (data.concepts.length) {
    side.append(el("table", {id: "concepts"}, el("tr", {}, el("th", {colspan: 2}, "Concept AUROC")),
      ...data.concepts.map(([name, auroc]) => el("tr", {}, el("td", {class: "text"}, name), el("td", {}, fmt(auroc))))));
  }
  parts.push(el("h2", {}, "Weights and concepts"), side);
  if (meta.logit_note) parts.push(el("p", {class: "muted"}, `Logit weights: ${meta.logit_note}.`));
  const top = el("div", {id: "top-examples"}, ...data.top.map(e => exampleLine(e, meta, vocab)));
  parts.push(el("h2", {}, "Max-activating examples"), top);
  const quantiles = el("div", {id: "quantile-examples"});
  data.quantile.forEach(group => {
    if (!group.examples.length) return;
    quantiles.append(el("h3", {}, `Interval ${group.interval + 1}/${meta.quantile_bins}: ${fmt(group.lo)} – ${fmt(group.hi)}`),
      ...group.examples.map(e => exampleLine(e, meta, vocab)));
  });
  parts.push(el("h2", {}, "Samples from activation intervals"), quantiles);
  root.replaceChildren(...parts);
  document.body.dataset.ready = "1";
}

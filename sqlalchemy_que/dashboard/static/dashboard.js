// The dashboard's refresh: fetch the page's data as JSON and write it into the page.
// Every piece of job data goes in through textContent or attribute values, never as HTML.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const body = document.body;
  const refreshUrl = body.dataset.refreshUrl;
  const refreshMs = Number(body.dataset.refreshMs) || 5000;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrfToken = csrfMeta ? csrfMeta.content : "";

  function el(name, attributes, text) {
    const node = document.createElement(name);
    for (const [key, value] of Object.entries(attributes || {})) {
      node.setAttribute(key, value);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function actionForm(action) {
    const form = el("form", { method: "post", action: action.url });
    form.append(
      el("input", { type: "hidden", name: "csrf_token", value: csrfToken }),
      el("input", { type: "hidden", name: "job_id", value: String(action.job_id) }),
      el("input", {
        type: "hidden",
        name: "next",
        value: window.location.pathname + window.location.search,
      }),
    );
    const button = el(
      "button",
      {
        type: "submit",
        class: action.cls || "",
        "data-action": action.label.toLowerCase(),
        "data-job-id": String(action.job_id),
      },
      action.label,
    );
    form.append(button);
    return form;
  }

  function renderTable(id, table) {
    const node = document.getElementById("table-" + id);
    if (!node) return;
    const tbody = el("tbody");
    const width = table.columns.length + (table.has_actions ? 1 : 0);
    if (table.rows.length === 0) {
      const tr = el("tr", { class: "empty" });
      tr.append(el("td", { colspan: String(width) }, table.empty));
      tbody.append(tr);
    }
    for (const row of table.rows) {
      const tr = el("tr");
      for (const cell of row.cells) {
        const td = el("td", cell.cls ? { class: cell.cls } : {});
        if (cell.href) td.append(el("a", { href: cell.href }, cell.text));
        else td.textContent = cell.text;
        tr.append(td);
      }
      if (table.has_actions) {
        const td = el("td", { class: "actions" });
        for (const action of row.actions || []) td.append(actionForm(action));
        tr.append(td);
      }
      tbody.append(tr);
    }
    node.tBodies[0].replaceWith(tbody);
  }

  function renderChart(node, series) {
    const names = [
      ["enqueued", "enqueued/s", "line-in"],
      ["done", "done/s", "line-out"],
    ];
    const width = 900, height = 220, left = 56, right = 12, top = 14, bottom = 28;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "throughput");
    const all = names.flatMap(([key]) => series[key] || []);
    const now = all.length ? Math.max(...all.map((p) => p[0])) : Date.now();
    const span = 15 * 60 * 1000;
    const tmin = all.length ? Math.max(Math.min(...all.map((p) => p[0])), now - span) : now - span;
    const ymax = Math.max(1, ...all.map((p) => p[1])) * 1.1;
    const x = (t) => left + ((t - tmin) / Math.max(1, now - tmin)) * (width - left - right);
    const y = (v) => top + (1 - v / ymax) * (height - top - bottom);
    function svgEl(name, attributes, text) {
      const node = document.createElementNS(SVG, name);
      for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
      if (text !== undefined) node.textContent = text;
      return node;
    }
    for (let i = 0; i <= 4; i++) {
      const v = (ymax / 4) * i;
      svg.append(svgEl("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid-line" }));
      svg.append(svgEl("text", { x: left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" },
        v >= 100 ? Math.round(v).toString() : v.toFixed(1)));
    }
    const minutes = Math.round((now - tmin) / 60000);
    svg.append(svgEl("text", { x: left, y: height - 8, class: "axis" },
      all.length ? (minutes ? `${minutes} min ago` : "just now") : "no samples yet: keep this page open"));
    svg.append(svgEl("text", { x: width - right, y: height - 8, class: "axis", "text-anchor": "end" }, "now"));
    names.forEach(([key, label, cls], index) => {
      const points = (series[key] || []).filter((p) => p[0] >= tmin);
      if (points.length) {
        svg.append(svgEl("polyline", {
          points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
          class: cls,
        }));
      }
      const last = points.length ? points[points.length - 1][1] : 0;
      const lx = left + 10 + index * 170;
      svg.append(svgEl("rect", { x: lx, y: top, width: 12, height: 4, class: cls + "-key" }));
      svg.append(svgEl("text", { x: lx + 18, y: top + 6, class: "legend" }, `${label} ${last.toFixed(1)}`));
    });
    node.replaceChildren(svg);
  }

  function apply(data) {
    for (const [key, value] of Object.entries(data.fields || {})) {
      for (const node of document.querySelectorAll(`[data-field="${key}"]`)) {
        if (node.textContent !== value) node.textContent = value;
      }
    }
    for (const [id, table] of Object.entries(data.tables || {})) renderTable(id, table);
    for (const [key, href] of Object.entries(data.links || {})) {
      const node = document.querySelector(`[data-link="${key}"]`);
      if (!node) continue;
      node.hidden = !href;
      node.setAttribute("href", href || "#");
    }
    const chart = document.getElementById("chart");
    if (chart && data.chart) renderChart(chart, data.chart);
  }

  const stamp = document.getElementById("refreshed");
  async function refresh() {
    try {
      const response = await fetch(refreshUrl, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      apply(await response.json());
      if (stamp) {
        stamp.textContent = "updated " + new Date().toLocaleTimeString();
        stamp.className = "";
      }
    } catch (error) {
      if (stamp) {
        stamp.textContent = "refresh failed: " + error.message;
        stamp.className = "stale";
      }
    } finally {
      window.setTimeout(refresh, refreshMs);
    }
  }

  const chart = document.getElementById("chart");
  if (chart) renderChart(chart, JSON.parse(chart.dataset.chart || "{}"));
  // Deleting asks first (the forms work without this script too, without the question).
  document.addEventListener("submit", (event) => {
    const button = event.target.querySelector("button.danger");
    if (button && !window.confirm(button.textContent + "?")) event.preventDefault();
  });
  if (refreshUrl) window.setTimeout(refresh, refreshMs);
})();

// The status page: reads /admin/checklist and /admin/status every few seconds and
// draws them. No framework, no CDN: this file and index.html are compiled into the
// binary. Every value goes in through textContent, never as HTML (user agents and
// account names come from clients).
"use strict";

const REFRESH_MS = 3000;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function lamp(light) {
  return el("span", { class: "light " + light, title: light });
}

function itemRow(item, account) {
  const attrs = { class: "item", "data-item": item.id, "data-light": item.light };
  if (account !== undefined) attrs["data-account"] = account;
  return el("tr", attrs,
    el("td", { class: "lamp" }, lamp(item.light)),
    el("td", { class: "title" }, item.title),
    el("td", { class: "summary" }, item.summary));
}

function replaceBody(table, rows) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...rows);
}

function drawChecklist(report) {
  const overall = document.getElementById("overall");
  overall.className = "light " + report.light;
  overall.title = report.light;
  document.body.setAttribute("data-light", report.light);
  document.getElementById("meta").textContent =
    `${report.light.toUpperCase()} · ${report.accounts.length} account(s) · ${report.uptime_seconds} s of traffic · ${report.generated_at}`;
  const accounts = document.getElementById("accounts");
  if (report.accounts.length === 0) {
    accounts.replaceChildren(el("p", { class: "empty" }, "no traffic yet"));
  } else {
    accounts.replaceChildren(...report.accounts.map((a) =>
      el("div", { class: "account", "data-account": a.account, "data-light": a.light },
        el("h3", {}, lamp(a.light), ` account ${a.account} · ${a.requests} requests`),
        el("table", { class: "items" }, el("tbody", {}, ...a.items.map((i) => itemRow(i, a.account)))))));
  }
  replaceBody("#health", report.health.map((i) => itemRow(i)));
  replaceBody("#alerts", report.alerts.map((a) =>
    el("tr", { "data-alert": a.name, "data-state": a.state },
      el("td", {}, a.name), el("td", {}, a.severity), el("td", { class: a.state }, a.state), el("td", {}, a.detail))));
}

function drawStatus(status) {
  replaceBody("#buckets", status.buckets.length === 0
    ? [el("tr", {}, el("td", { class: "empty", colSpan: 6 }, "no active buckets"))]
    : status.buckets.map((b) => {
      const fill = Math.round(b.fill * 100);
      const bar = el("span", { class: "bar" }, el("span", {}));
      bar.firstChild.style.width = Math.min(fill, 100) + "%";
      return el("tr", { "data-operation": b.operation },
        el("td", {}, b.account), el("td", {}, b.operation), el("td", {}, b.bucket),
        el("td", {}, b.windows.map((w) => `${w.window} ${w.used}/${w.limit}`).join(", ")),
        el("td", {}, bar, ` ${fill}%`), el("td", {}, b.queued));
    }));
  replaceBody("#recent", status.recent.length === 0
    ? [el("tr", {}, el("td", { class: "empty", colSpan: 6 }, "no waits or errors yet"))]
    : status.recent.slice(0, 20).map((r) =>
      el("tr", {}, el("td", {}, r.at), el("td", {}, r.account), el("td", {}, r.operation),
        el("td", {}, r.status), el("td", {}, r.code || ""), el("td", {}, r.wait_ms + " ms"))));
}

async function getJson(path) {
  const resp = await fetch(path, { cache: "no-store" });
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

async function refresh() {
  try {
    const [report, status] = await Promise.all([getJson("/admin/checklist"), getJson("/admin/status")]);
    drawChecklist(report);
    drawStatus(status);
    document.body.setAttribute("data-loaded", report.generated_at);
  } catch (e) {
    document.getElementById("meta").textContent = "cannot reach the proxy's admin listener: " + e.message;
    document.body.setAttribute("data-light", "grey");
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();

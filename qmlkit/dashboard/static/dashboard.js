// qmlkit dashboard: live updates over the WebSocket, and confirmed actions via the API.
// Served as a static file (the Content-Security-Policy forbids inline scripts). Text
// from jobs is only ever set with textContent or attributes, never parsed as HTML.
"use strict";

(function () {
  const body = document.body;
  const view = body.dataset.view;
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.from((root || document).querySelectorAll(sel)); }
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function fmt(iso) {
    if (!iso) return "–";
    return iso.replace("T", " ").replace(/\.\d+/, "").replace(/(Z|\+00:00)$/, "");
  }
  function pct(fraction) { return Math.round(fraction * 100) + "%"; }

  function flash(text, isError) {
    const box = $("#flash");
    if (!box) return;
    box.textContent = text;
    box.classList.toggle("error", !!isError);
    box.hidden = false;
  }

  function progressNodes(p) {
    const nodes = [];
    if (!p) return nodes;
    const bar = el("progress", { class: "bar", max: "1", value: String(p.fraction), title: pct(p.fraction) }, pct(p.fraction));
    nodes.push(bar, document.createTextNode(" "), el("span", { class: "pct" }, pct(p.fraction)));
    if (p.message) nodes.push(document.createTextNode(" "), el("span", { class: "pmsg" }, p.message));
    return nodes;
  }

  // --- live updates -----------------------------------------------------------------

  function onStats(stats) {
    for (const node of $all("[data-count-state]")) {
      const n = stats.states[node.dataset.countState];
      node.textContent = String(n === undefined ? 0 : n);
    }
    for (const node of $all("[data-count-total]")) node.textContent = String(stats.total);
    for (const node of $all("[data-servers-live]")) node.textContent = String(stats.servers_live);
    const table = $("#queues tbody");
    if (table) {
      for (const [queue, counts] of Object.entries(stats.queues)) {
        let row = $all("tr[data-queue]", table).find((r) => r.dataset.queue === queue);
        if (!row) {
          row = el("tr", { "data-queue": queue });
          const cell = el("td");
          cell.appendChild(el("a", { href: "/jobs?queue=" + encodeURIComponent(queue) }, queue));
          row.appendChild(cell);
          for (const state of Object.keys(stats.states)) {
            row.appendChild(el("td", { class: "num", "data-count-queue": queue, "data-state": state }, "0"));
          }
          table.appendChild(row);
        }
        for (const cell of $all("td[data-state]", row)) {
          const n = counts[cell.dataset.state];
          cell.textContent = String(n === undefined ? 0 : n);
        }
      }
    }
    refreshChart();
  }

  let chartAt = 0;
  function refreshChart() {
    const img = $("#throughput");
    const now = Date.now();
    if (!img || now - chartAt < 5000) return;
    chartAt = now;
    img.src = "/charts/throughput.svg?minutes=" + img.dataset.minutes + "&t=" + now;
  }

  function onJobs(page) {
    const tbody = $("#jobs tbody");
    const tmpl = $("#job-row");
    if (!tbody || !tmpl) return;
    const rows = [];
    for (const job of page.jobs) {
      const row = tmpl.content.firstElementChild.cloneNode(true);
      row.dataset.jobId = job.id;
      const link = $(".id a", row);
      link.href = "/jobs/" + encodeURIComponent(job.id);
      link.textContent = "…" + job.id.slice(-12);
      link.title = job.id;
      $(".method", row).textContent = job.method;
      $(".queue", row).textContent = job.queue;
      const badge = $(".badge", row);
      badge.textContent = job.state;
      badge.className = "badge state-" + job.state;
      $(".attempts", row).textContent = String(job.attempts);
      $(".created", row).textContent = fmt(job.created_at);
      // A finished job's last report is history: the bar shows only until it succeeds.
      $(".progress", row).replaceChildren(...progressNodes(job.state === "Succeeded" ? null : job.progress));
      $(".detail", row).textContent = job.detail;
      rows.push(row);
    }
    if (!rows.length) {
      const row = el("tr", { class: "empty" });
      row.appendChild(el("td", { colspan: "8" }, "No jobs match."));
      rows.push(row);
    }
    tbody.replaceChildren(...rows);
    const total = $("[data-jobs-total]");
    if (total && page.total !== null) total.textContent = String(page.total);
    const pages = $("[data-jobs-pages]");
    if (pages && page.total !== null) pages.textContent = String(Math.max(1, Math.ceil(page.total / page.limit)));
  }

  function onJob(job) {
    if (job.state !== body.dataset.jobState) {
      // A new state brings new sections (error, result, history, actions): redraw.
      window.location.reload();
      return;
    }
    const progress = $("#job-progress");
    if (progress) {
      const nodes = progressNodes(job.progress);
      if (nodes.length) progress.replaceChildren(...nodes);
    }
    const detail = $("#job-detail");
    if (detail) detail.textContent = job.detail;
    const attempts = $("#job-attempts");
    if (attempts) attempts.textContent = String(job.attempts);
  }

  function onServers(servers) {
    const tbody = $("#servers tbody");
    if (!tbody) return;
    const rows = servers.map((s) => {
      const row = el("tr", { "data-server-id": s.id });
      row.appendChild(el("td", {}, s.id));
      const status = el("td");
      status.appendChild(el("span", { class: "badge " + (s.alive ? "alive" : "dead") }, s.alive ? "live" : "dead"));
      row.appendChild(status);
      row.appendChild(el("td", { class: "num" }, s.heartbeat_age_s));
      row.appendChild(el("td", { class: "num" }, s.worker_count));
      row.appendChild(el("td", {}, s.queues.join(", ") || "all"));
      row.appendChild(el("td", {}, fmt(s.started_at)));
      return row;
    });
    if (!rows.length) {
      const row = el("tr", { class: "empty" });
      row.appendChild(el("td", { colspan: "6" }, "No server is registered."));
      rows.push(row);
    }
    tbody.replaceChildren(...rows);
  }

  function subscription() {
    const d = body.dataset;
    if (view === "jobs") {
      return { view: "jobs", state: d.state || null, queue: d.queue || null, method: d.method || null,
               limit: Number(d.limit || 50), offset: Number(d.offset || 0) };
    }
    if (view === "job") return { view: "job", id: d.id };
    if (view === "servers") return { view: "servers" };
    return { view: "overview" };
  }

  let retryMs = 500;
  function connect() {
    if (view === "login" || view === "missing") return;
    const status = $("#live");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/api/live");
    ws.addEventListener("open", () => {
      retryMs = 500;
      if (status) { status.textContent = "live"; status.classList.add("on"); }
      ws.send(JSON.stringify(subscription()));
    });
    ws.addEventListener("message", (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      if (msg.type === "stats") onStats(msg.stats);
      else if (msg.type === "jobs") onJobs(msg.page);
      else if (msg.type === "job") onJob(msg.job);
      else if (msg.type === "servers") onServers(msg.servers);
      else if (msg.type === "gone") flash("This job no longer exists.", true);
    });
    ws.addEventListener("close", () => {
      if (status) { status.textContent = "reconnecting…"; status.classList.remove("on"); }
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    });
  }

  // --- actions: confirm in a <dialog>, then POST to the API with the CSRF token ------------

  function confirmDialog(text) {
    const dialog = $("#confirm");
    $("#confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  async function runAction(button) {
    if (!(await confirmDialog(button.dataset.confirm))) return;
    button.disabled = true;
    let answer = {};
    let response;
    try {
      response = await fetch(button.dataset.url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, Accept: "application/json" },
      });
      answer = await response.json().catch(() => ({}));
    } catch (e) {
      flash("The dashboard could not be reached: " + e, true);
      button.disabled = false;
      return;
    }
    if (!response.ok) {
      flash("Refused (" + response.status + "): " + (answer.detail || response.statusText), true);
      button.disabled = false;
      return;
    }
    flash(answer.message || "Done.");
    const kind = button.dataset.action;
    if (kind === "remove") {
      const row = button.closest("tr");
      if (row) row.remove();
    } else if (kind === "trigger" && answer.job_id) {
      const box = $("#flash");
      box.appendChild(document.createTextNode(" "));
      box.appendChild(el("a", { href: "/jobs/" + encodeURIComponent(answer.job_id) }, "open it"));
      button.disabled = false;
    } else if (view === "job") {
      window.location.reload();
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) {
      event.preventDefault();
      runAction(button);
    }
  });

  connect();
})();

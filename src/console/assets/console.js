// Ferry console: renders the control plane's state, pushed as server-sent
// events from /console/events, and draws the load history with uPlot.
// Plain script, no build step. Read-only: it never writes anything.
"use strict";

(function () {
  // Errors of this page, kept where a test (or a person) can read them.
  var errors = document.getElementById("errors");
  function noteError(text) {
    var li = document.createElement("li");
    li.textContent = String(text);
    errors.appendChild(li);
  }
  window.addEventListener("error", function (e) {
    // Capture phase: a script, style or image that failed to load too.
    var what = e.target && e.target !== window ? "cannot load " + (e.target.src || e.target.href) : e.message;
    noteError(what || e);
  }, true);
  window.addEventListener("unhandledrejection", function (e) { noteError(e.reason); });
  document.addEventListener("securitypolicyviolation", function (e) {
    noteError("blocked by the content security policy: " + e.violatedDirective + " " + e.blockedURI);
  });
  var consoleError = console.error;
  console.error = function () {
    noteError(Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };

  var PALETTE = ["#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#e03131"];
  var token = new URLSearchParams(location.search).get("token");
  var charts = {}; // service name -> {key, plots: [uPlot], box}

  // el("td", {class: "num"}, "text", child...): a DOM element.
  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, attrs[k]);
    });
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function table(headers, rows) {
    var head = el("tr", {});
    headers.forEach(function (h) { head.appendChild(el("th", {}, h)); });
    var t = el("table", {}, el("thead", {}, head));
    var body = el("tbody", {});
    rows.forEach(function (r) { body.appendChild(r); });
    t.appendChild(body);
    return t;
  }

  function replace(id, node) {
    var box = document.getElementById(id);
    box.replaceChildren(node);
  }

  function when(ms) {
    return ms ? new Date(ms).toLocaleTimeString() : "—";
  }

  function age(nowMs, ms) {
    if (!ms) return "never";
    var s = Math.max(0, Math.round((nowMs - ms) / 1000));
    return s < 120 ? s + " s ago" : Math.round(s / 60) + " min ago";
  }

  function percent(bp) {
    return (bp / 100).toFixed(bp % 100 === 0 ? 0 : 2) + " %";
  }

  // A weight bar; its width set through the CSSOM, which the content
  // security policy allows (style attributes it does not).
  function bar(bp) {
    var fill = el("span", {});
    fill.style.width = (bp / 100) + "%";
    return el("span", { class: "bar" }, fill);
  }

  function pill(text, kind) {
    return el("span", { class: "pill " + (kind || "") }, text);
  }

  // --- services -----------------------------------------------------------

  function renderServices(state) {
    var box = document.getElementById("services");
    var seen = {};
    state.services.forEach(function (svc) {
      seen[svc.name] = true;
      var card = box.querySelector('[data-service-card="' + CSS.escape(svc.name) + '"]');
      if (!card) {
        card = el("div", { class: "card", "data-service-card": svc.name },
          el("div", { class: "head" }), el("div", { class: "charts" }));
        box.appendChild(card);
      }
      card.firstChild.replaceChildren(serviceHead(svc));
      drawCharts(svc, card.lastChild);
    });
    Array.prototype.slice.call(box.children).forEach(function (card) {
      var name = card.getAttribute("data-service-card");
      if (!seen[name]) {
        dropCharts(name);
        card.remove();
      }
    });
    if (!state.services.length) {
      box.replaceChildren(el("p", { class: "muted" }, "No service in the catalog."));
    }
  }

  function serviceHead(svc) {
    var title = el("h3", {}, svc.name, " ",
      el("span", { class: "muted" }, "ports " + svc.ports.join(", ") + " · weights from " + svc.weights_from));
    var pin = svc.pin ? el("p", { class: "pin", "data-pin-owner": svc.pin.owner },
      pill("pinned", "warn"), " by ", el("b", {}, svc.pin.owner), ": " + svc.pin.reason +
      (svc.pin.expires_at_ms ? " (until " + when(svc.pin.expires_at_ms) + ")" : " (no expiry)")) : null;
    var rows = svc.clusters.map(function (c) {
      return el("tr", {
          "data-service": svc.name, "data-cluster": c.cluster,
          "data-weight-bp": c.weight_bp, "data-stale": c.stale ? "true" : "false" },
        el("td", {}, c.cluster),
        el("td", {}, bar(c.weight_bp), " ", percent(c.weight_bp)),
        el("td", { class: "num weight-bp" }, c.weight_bp),
        el("td", { class: "num" }, c.ready + " / " + c.endpoints),
        el("td", { class: "health" }, c.stale ? pill("stale", "bad") : pill("fresh", "ok")),
        el("td", { class: "muted" }, loadSummary(c.chart)));
    });
    var wrap = el("div", {}, title, pin,
      table(["cluster", "weight", "bp", "ready / total", "discovery", "last 5 s"], rows));
    return wrap;
  }

  function last(values) {
    for (var i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
    return null;
  }

  function loadSummary(chart) {
    if (!chart) return "no load reports";
    var n = chart.requests_per_s.length;
    var rps = n ? chart.requests_per_s[n - 1] : 0;
    var err = n ? chart.error_rate[n - 1] : null;
    var text = rps.toFixed(1) + " req/s";
    if (err !== null) text += ", " + (err * 100).toFixed(2) + " % errors";
    var p99 = last(chart.p99_ms);
    text += chart.latency_reported && p99 !== null ? ", p99 " + p99.toFixed(1) + " ms" : ", counts only";
    return text;
  }

  // One chart per metric per service; one line per cluster (latency: p50
  // dashed, p99 solid).
  function drawCharts(svc, box) {
    var withData = svc.clusters.filter(function (c) { return c.chart; });
    if (!withData.length) {
      dropCharts(svc.name);
      box.replaceChildren(el("p", { class: "muted" }, "No load reported in the last 15 minutes."));
      return;
    }
    var key = withData.map(function (c) { return c.cluster + ":" + c.chart.latency_reported; }).join(",");
    var data = chartData(withData);
    var current = charts[svc.name];
    if (current && current.key === key) {
      current.plots.forEach(function (p, i) { p.setData(data[i]); });
      updateNotes(current, withData);
      return;
    }
    dropCharts(svc.name);
    box.replaceChildren();
    var specs = [
      { title: "requests/s", unit: "", fmt: function (v) { return v.toFixed(1); } },
      { title: "error rate", unit: " %", fmt: function (v) { return v.toFixed(2); } },
      { title: "latency p50 (dashed) / p99", unit: " ms", fmt: function (v) { return v.toFixed(1); } },
    ];
    var plots = specs.map(function (spec, i) {
      var holder = el("div", { class: "chart", "data-chart": spec.title });
      box.appendChild(holder);
      var series = [{}];
      withData.forEach(function (c, ci) {
        var color = PALETTE[ci % PALETTE.length];
        if (i < 2) {
          series.push({ label: c.cluster, stroke: color, width: 1.5, spanGaps: false,
            value: function (u, v) { return v === null ? "—" : spec.fmt(v) + spec.unit; } });
        } else {
          series.push({ label: c.cluster + " p50", stroke: color, width: 1, dash: [4, 3],
            value: function (u, v) { return v === null ? "—" : spec.fmt(v) + spec.unit; } });
          series.push({ label: c.cluster + " p99", stroke: color, width: 1.5,
            value: function (u, v) { return v === null ? "—" : spec.fmt(v) + spec.unit; } });
        }
      });
      var opts = {
        title: spec.title, width: Math.max(240, holder.clientWidth), height: 170,
        scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(max || 0, 1)]; } } },
        series: series, legend: { live: true },
        axes: [{}, { size: 50 }],
      };
      var plot = new uPlot(opts, data[i], holder);
      holder.appendChild(el("div", { class: "note" }));
      return plot;
    });
    charts[svc.name] = { key: key, plots: plots, box: box };
    updateNotes(charts[svc.name], withData);
  }

  function updateNotes(entry, clusters) {
    var countsOnly = clusters.filter(function (c) { return !c.chart.latency_reported; })
      .map(function (c) { return c.cluster; });
    var note = entry.box.querySelectorAll(".note")[2];
    if (note) {
      note.textContent = countsOnly.length
        ? "No latency for " + countsOnly.join(", ") + ": counts only (reported by Envoy, whose load reports carry no latency)."
        : "";
    }
  }

  function chartData(clusters) {
    var first = clusters[0].chart;
    var xs = first.requests_per_s.map(function (_, i) { return (first.start_ms + i * first.step_ms) / 1000; });
    var rps = [xs], err = [xs], lat = [xs];
    clusters.forEach(function (c) {
      rps.push(c.chart.requests_per_s);
      err.push(c.chart.error_rate.map(function (v) { return v === null ? null : v * 100; }));
      lat.push(c.chart.p50_ms);
      lat.push(c.chart.p99_ms);
    });
    return [rps, err, lat];
  }

  function dropCharts(name) {
    var entry = charts[name];
    if (!entry) return;
    entry.plots.forEach(function (p) { p.destroy(); });
    delete charts[name];
  }

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (name) {
      charts[name].plots.forEach(function (p) {
        p.setSize({ width: Math.max(240, p.root.parentNode.clientWidth), height: 170 });
      });
    });
  });

  // --- migrations ---------------------------------------------------------

  function renderMigrations(state) {
    if (!state.migrations.length) {
      replace("migrations", el("p", { class: "muted" }, "No migration."));
      return;
    }
    var list = el("div", {});
    state.migrations.forEach(function (m) { list.appendChild(migrationCard(m)); });
    replace("migrations", list);
  }

  function migrationCard(m) {
    var timeline = el("div", { class: "timeline" });
    m.timeline.forEach(function (t) {
      timeline.appendChild(el("span", { "data-stage": t.stage, "data-state": t.state }, t.stage));
    });
    var step = m.step
      ? "step " + m.step + " of " + m.steps_bp.length + " (" + m.to + " " + percent(m.steps_bp[m.step - 1] || 0) + ")"
      : "before the first step";
    var weights = Object.keys(m.weights_bp).map(function (c) { return c + " " + percent(m.weights_bp[c]); }).join(", ");
    var rolledBack = /ROLL|FAILED/.test(m.stage);
    return el("div", { class: "card", "data-migration": m.id, "data-stage": m.stage, "data-step": m.step },
      el("h3", {}, m.service + ": " + m.from.join(", ") + " → " + m.to + " ",
        el("span", { class: "muted" }, m.id + " · by " + m.created_by + " · " + when(m.updated_at_ms))),
      timeline,
      el("p", {}, el("b", { class: "stage" }, m.stage + (m.phase ? " / " + m.phase : "")), " · ",
        el("span", { class: "step" }, step), weights ? " · weights " + weights : "",
        m.waiting ? el("span", { class: "muted" }, " · " + m.waiting) : null),
      m.reason ? el("p", { class: rolledBack ? "reason" : "muted" }, (rolledBack ? "Rollback: " : "") + m.reason) : null,
      m.gates.length ? gatesTable(m) : el("p", { class: "muted" }, "No gate evaluated yet."));
  }

  function ratio(pair) {
    var req = pair[0], errs = pair[1];
    return req + " req, " + errs + " err" + (req ? " (" + (errs / req * 100).toFixed(2) + " %)" : "");
  }

  function ms(v) { return v === null || v === undefined ? "—" : v.toFixed(1) + " ms"; }

  function gatesTable(m) {
    var rows = m.gates.slice(-8).map(function (g) {
      var kind = g.outcome === "pass" ? "ok" : g.outcome === "fail" ? "bad" : "warn";
      return el("tr", { "data-gate-step": g.step + 1, "data-outcome": g.outcome },
        el("td", { class: "num" }, g.step + 1),
        el("td", {}, pill(g.outcome.replace(/_/g, " "), kind)),
        el("td", {}, ratio(g.source)),
        el("td", {}, ratio(g.target)),
        el("td", {}, ms(g.latency.source_p99_ms) + " / " + ms(g.latency.target_p99_ms)),
        el("td", {}, g.detail),
        el("td", { class: "muted" }, when(g.at_ms)));
    });
    return table(["step", "verdict", "source", "target", "p99 source / target", "detail", "at"], rows);
  }

  // --- audit, clients, discovery -----------------------------------------

  function renderAudit(state) {
    if (state.audit_error) {
      replace("audit", el("p", { class: "reason" }, "Cannot read the audit log: " + state.audit_error));
      return;
    }
    var rows = state.audit.map(function (a) {
      return el("tr", {}, el("td", { class: "muted" }, when(a.at_ms)), el("td", {}, a.actor),
        el("td", {}, a.action), el("td", {}, a.service), el("td", {}, a.reason),
        el("td", { class: "muted" }, a.detail));
    });
    replace("audit", rows.length ? table(["when", "who", "what", "service", "why", "detail"], rows)
      : el("p", { class: "muted" }, "Empty."));
  }

  function renderClients(state) {
    var rows = state.clients.map(function (c) {
      var acked = Object.keys(c.types).map(function (t) {
        var v = c.types[t];
        return t + " " + (v.acked_version || "—") + (v.awaiting_ack ? " (awaiting ACK)" : "");
      }).join(" · ");
      var nack = null;
      Object.keys(c.types).forEach(function (t) {
        var n = c.types[t].last_nack;
        if (n && (!nack || n.at_ms > nack.at_ms)) nack = { type: t, at_ms: n.at_ms, text: n.rejected_version + ": " + n.message };
      });
      return el("tr", { "data-node": c.node_id }, el("td", {}, c.node_id),
        el("td", { class: c.identity ? "" : "muted" }, c.identity || "unauthenticated"), el("td", {}, c.variant),
        el("td", {}, el("code", {}, acked)),
        el("td", { class: nack ? "reason" : "muted" }, nack ? nack.type + " " + when(nack.at_ms) + " " + nack.text : "none"));
    });
    replace("clients", rows.length ? table(["node", "identity", "ADS", "ACKed versions", "last NACK"], rows)
      : el("p", { class: "muted" }, "No client connected."));
  }

  function renderDiscovery(state) {
    var rows = state.discovery.map(function (d) {
      var kind = d.health === "connected" ? "ok" : d.health === "connecting" ? "warn" : "bad";
      return el("tr", { "data-kube-cluster": d.cluster, "data-health": d.health },
        el("td", {}, d.cluster), el("td", {}, pill(d.health, kind)),
        el("td", {}, age(state.at_ms, d.last_sync_ms)),
        el("td", { class: "num" }, d.services), el("td", { class: "num" }, d.endpoints),
        el("td", { class: "muted" }, d.last_error || ""));
    });
    replace("discovery", rows.length ? table(["cluster", "state", "synced", "services", "endpoints", "last error"], rows)
      : el("p", { class: "muted" }, "No Kubernetes cluster watched (catalog file only)."));
  }

  function render(state) {
    document.getElementById("summary").textContent = (state.ready ? "ready" : "not ready") +
      " · policy v" + state.policy_version + " · " + state.store + " store" +
      (state.leading ? "" : " · follower");
    var updated = document.getElementById("updated");
    updated.textContent = "updated " + when(state.at_ms);
    updated.setAttribute("data-at", state.at_ms);
    [renderServices, renderMigrations, renderAudit, renderClients, renderDiscovery].forEach(function (f) {
      try { f(state); } catch (e) { noteError(f.name + ": " + (e && e.stack || e)); }
    });
  }

  // --- live updates -------------------------------------------------------

  var link = document.getElementById("link");
  function connect() {
    var source = new EventSource("/console/events" + (token ? "?token=" + encodeURIComponent(token) : ""));
    source.addEventListener("state", function (e) {
      link.textContent = "live";
      link.setAttribute("data-state", "live");
      render(JSON.parse(e.data));
    });
    // EventSource reconnects by itself; show that the page is behind.
    source.addEventListener("error", function () {
      link.textContent = "reconnecting…";
      link.setAttribute("data-state", "down");
    });
  }
  connect();
})();

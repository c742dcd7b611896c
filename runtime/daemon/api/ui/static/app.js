/* treadle's web view: the run page, live.
 *
 * The server draws the page and the DAG; this script follows the run's events
 * (Server-Sent Events: EventSource resumes by itself with Last-Event-ID), colours the DAG's
 * nodes and appends token streams as they arrive, and re-reads the run's state (timeline,
 * node inputs/outputs/errors, requests for input) a few times a second while events come.
 * Data only ever goes into the page as text (textContent), never as markup.
 */
"use strict";

(() => {
  const page = document.body.dataset.page;
  if (page !== "run") return;

  const base = document.body.dataset.base || "";
  const section = document.querySelector("section.run");
  const runId = section.dataset.run;
  const api = `${base}/api/runs/${encodeURIComponent(runId)}`;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const MAX_EVENTS = 500;
  const REFRESH_MS = 400;

  const $ = (id) => document.getElementById(id);
  const badge = $("run-status");
  let status = badge.textContent.trim();
  let stream = null;
  let refreshTimer = null;
  let refreshing = false;
  let again = false;
  let selected = null;
  let formsFor = "";
  const streams = new Map(); // call id -> <pre>
  // node -> [status, seq] from the events: newer than the state's journal until it commits
  const live = new Map();

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (value !== undefined && value !== null) node.setAttribute(key, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function show(value) {
    if (value && typeof value === "object" && value.truncated) return value.json;
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  function setStatus(next) {
    status = next;
    badge.className = `badge st-${next}`;
    badge.textContent = next;
  }

  // -- the DAG -------------------------------------------------------------------------

  function dagNode(id) {
    for (const g of document.querySelectorAll("svg.dag g.node")) {
      if (g.dataset.node === id) return g;
    }
    return null;
  }

  function colour(id, st) {
    const g = dagNode(id);
    if (!g) return;
    for (const c of [...g.classList]) if (c.startsWith("st-")) g.classList.remove(c);
    g.classList.add(`st-${st}`);
  }

  function select(id) {
    selected = id;
    for (const g of document.querySelectorAll("svg.dag g.node")) {
      g.classList.toggle("selected", g.dataset.node === id);
    }
    for (const card of document.querySelectorAll(".node-card")) {
      const mine = card.dataset.node === id;
      card.classList.toggle("selected", mine);
      if (mine) {
        card.open = true;
        card.scrollIntoView({ block: "nearest" });
      }
    }
  }

  for (const g of document.querySelectorAll("svg.dag g.node")) {
    g.addEventListener("click", () => select(g.dataset.node));
    g.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") select(g.dataset.node);
    });
  }

  // -- events, as they happen -------------------------------------------------------------

  const NODE_STATUS = {
    node_started: "running",
    node_finished: "done",
    node_failed: "failed",
    node_skipped: "skipped",
    input_requested: "waiting",
  };
  const QUIET = new Set(["seq", "run_id", "ts", "kind", "text"]);

  function logEvent(e) {
    const list = $("events");
    const rest = Object.entries(e)
      .filter(([k, v]) => !QUIET.has(k) && v !== null && v !== "" && v !== false)
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join(" ");
    const extra = e.kind === "llm_tokens" ? `${rest} +${e.text.length} chars` : rest;
    list.append(
      el("li", {}, el("span", { class: "seq", text: String(e.seq) }),
        el("span", { class: "kind", text: e.kind }), el("span", { class: "rest", text: extra })),
    );
    while (list.children.length > MAX_EVENTS) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
  }

  function appendTokens(e) {
    const box = $("tokens");
    let pre = streams.get(e.call_id);
    if (!pre) {
      if (streams.size === 0) box.textContent = "";
      pre = el("pre");
      box.append(el("div", { class: "stream" },
        el("div", { class: "who", text: `${e.node} · ${e.call_id}` }), pre));
      streams.set(e.call_id, pre);
    }
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent += e.text;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }

  function onEvent(e) {
    const st = NODE_STATUS[e.kind];
    if (st) {
      live.set(e.node, [st, e.seq]);
      colour(e.node, st);
    }
    if (e.kind === "run_started") setStatus("running");
    if (e.kind === "run_waiting") setStatus("waiting");
    if (e.kind === "llm_tokens") appendTokens(e);
    logEvent(e);
    if (e.kind === "run_finished") {
      setStatus(e.status);
      close();
      refresh();
    } else if (e.kind === "run_waiting" || e.kind === "input_requested") {
      refresh();
    } else {
      scheduleRefresh();
    }
  }

  function open() {
    stream = new EventSource(`${api}/events`);
    stream.onmessage = null;
    stream.onerror = () => {
      // a stream the server ended: finished runs stay closed; others reconnect by themselves
      if (TERMINAL.has(status)) close();
      else refresh();
    };
    for (const kind of KINDS) {
      stream.addEventListener(kind, (msg) => onEvent(JSON.parse(msg.data)));
    }
  }

  function close() {
    if (stream) stream.close();
    stream = null;
  }

  const KINDS = [
    "run_started", "node_ready", "node_started", "node_retrying", "node_finished",
    "node_failed", "node_skipped", "graph_extended", "llm_call_queued", "llm_call_dispatched",
    "llm_tokens", "llm_call_finished", "tool_call_started", "tool_call_finished", "pin_set",
    "pin_released", "input_requested", "input_received", "run_waiting", "cache_hit",
    "run_finished",
  ];

  // -- the state: timeline, nodes, run, requests for input ---------------------------------

  function scheduleRefresh() {
    if (refreshTimer === null) refreshTimer = setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    if (refreshTimer !== null) clearTimeout(refreshTimer);
    refreshTimer = null;
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    try {
      const resp = await fetch(`${api}/state`, { headers: { Accept: "application/json" } });
      if (resp.status === 401) {
        window.location.assign(`${base}/login?next=${encodeURIComponent(location.pathname)}`);
        return;
      }
      if (resp.ok) render(await resp.json());
    } catch (err) {
      // the network blinked: the next event, or the stream's reconnect, refreshes again
    } finally {
      refreshing = false;
      if (again) {
        again = false;
        scheduleRefresh();
      }
    }
  }

  function render(state) {
    const run = state.run;
    if (TERMINAL.has(run.status) || !stream) setStatus(run.status);
    if (TERMINAL.has(run.status)) close();
    const when = new Date(run.created_at * 1000).toLocaleString();
    const version = run.workflow_version ? `version ${run.workflow_version} · ` : "";
    const took = state.timeline ? ` · ${state.timeline.duration_s.toFixed(2)} s` : "";
    $("run-meta").textContent = `${version}created ${when}${took}`;
    const error = $("run-error");
    error.hidden = !run.error;
    error.textContent = run.error || "";
    for (const node of state.nodes) {
      // the state is the journal: an event that came live after it says more
      const seen = live.get(node.id);
      if (seen && seen[1] > state.last_seq) node.status = seen[0];
      colour(node.id, node.status);
    }
    renderNodes(state.nodes);
    renderRun(run);
    renderTimeline(state.timeline);
    renderAsk(run);
  }

  function value(label, v, cls) {
    return [el("div", { class: "kv", text: label }),
      el("pre", { class: `value${cls ? ` ${cls}` : ""}`, text: show(v) })];
  }

  function renderNodes(nodes) {
    const box = $("nodes");
    const open = new Set([...box.querySelectorAll("details[open]")].map((d) => d.dataset.node));
    box.textContent = "";
    if (!nodes.length) {
      box.append(el("p", { class: "empty", text: "The workflow is not available to list." }));
      return;
    }
    for (const node of nodes) {
      const card = el("details", { class: "node-card", "data-node": node.id },
        el("summary", {}, el("span", { class: `dot st-${node.status}` }),
          el("span", { class: "name", text: node.id }),
          el("span", { class: "kind", text: node.instances
            ? `${node.kind} · ${node.instances} instances` : node.kind }),
          el("span", { class: "kind", text: node.status })));
      const body = el("div", { class: "body" });
      const names = Object.keys(node.inputs);
      if (names.length) body.append(...value("inputs", node.inputs));
      if (node.has_output) body.append(...value("output", node.output));
      if (node.error) body.append(...value("error", node.error, "error"));
      if (!names.length && !node.has_output && !node.error) {
        body.append(el("p", { class: "empty", text: "Nothing yet." }));
      }
      card.append(body);
      card.open = open.has(node.id) || node.id === selected;
      card.classList.toggle("selected", node.id === selected);
      box.append(card);
    }
  }

  function renderRun(run) {
    const box = $("run-io");
    box.textContent = "";
    box.append(...value("inputs", run.inputs));
    if (run.output !== null && run.output !== undefined) box.append(...value("output", run.output));
  }

  function renderTimeline(timeline) {
    const box = $("timeline");
    box.textContent = "";
    if (!timeline || !timeline.rows.length) {
      box.append(el("p", { class: "empty", text: "Nothing has run yet." }));
      return;
    }
    const total = Math.max(timeline.duration_s, 1e-3);
    const pct = (s) => `${Math.min(100, Math.max(0, (100 * s) / total)).toFixed(3)}%`;
    for (const row of timeline.rows.slice(0, 400)) {
      const label = el("div", { class: `tl-label${row.kind === "node" ? "" : " sub"}`,
        text: `${"  ".repeat(row.depth)}${row.label}`, title: row.id });
      label.style.paddingLeft = `${row.depth * 12}px`;
      const track = el("div", { class: "tl-track" });
      const segments = row.segments.length ? row.segments
        : [{ kind: row.kind === "node" ? "attempt" : "call", start_s: row.start_s,
          end_s: row.end_s ?? total }];
      for (const seg of segments) {
        const bar = el("div", { class: `seg seg-${seg.kind}`,
          title: `${seg.kind} ${(seg.end_s - seg.start_s).toFixed(3)} s` });
        bar.style.left = pct(seg.start_s);
        bar.style.width = pct(seg.end_s - seg.start_s);
        track.append(bar);
      }
      box.append(el("div", { class: "tl-row" }, label, track));
    }
    box.append(el("div", { class: "tl-axis" }, el("span", { text: "0 s" }),
      el("span", { text: `${total.toFixed(2)} s` })));
  }

  // -- answering a request for input --------------------------------------------------------

  function field(name, schema, initial) {
    const type = schema.type;
    const label = schema.title || name;
    if (type === "boolean") {
      const input = el("input", { type: "checkbox", name });
      input.checked = Boolean(initial);
      return { node: el("label", { class: "check" }, input, el("span", { text: label })),
        read: () => input.checked };
    }
    if (Array.isArray(schema.enum)) {
      const select = el("select", { name });
      for (const option of schema.enum) {
        const opt = el("option", { value: JSON.stringify(option), text: String(option) });
        opt.selected = option === initial;
        select.append(opt);
      }
      return { node: el("label", {}, el("span", { text: label }), select),
        read: () => JSON.parse(select.value) };
    }
    if (type === "integer" || type === "number" || type === "string") {
      const input = el("input", { name, type: type === "string" ? "text" : "number",
        step: type === "integer" ? "1" : "any" });
      if (initial !== undefined && initial !== null) input.value = String(initial);
      return { node: el("label", {}, el("span", { text: label }), input),
        read: () => {
          if (type === "string") return input.value;
          if (input.value === "") return null;
          return type === "integer" ? parseInt(input.value, 10) : parseFloat(input.value);
        } };
    }
    const area = el("textarea", { name });
    area.value = initial === undefined ? "" : JSON.stringify(initial, null, 2);
    return { node: el("label", {}, el("span", { text: `${label} (JSON)` }), area),
      read: () => JSON.parse(area.value || "null") };
  }

  function askForm(request) {
    const schema = request.answer_schema || {};
    const initial = request.has_default ? request.default : undefined;
    const form = el("form", { "data-node": request.node });
    const fields = [];
    const props = schema.type === "object" && schema.properties;
    if (props) {
      for (const [name, sub] of Object.entries(props)) {
        const start = initial && name in initial ? initial[name] : sub.default;
        const f = field(name, sub, start);
        fields.push([name, f]);
        form.append(f.node);
      }
    } else {
      const f = field("answer", schema, initial);
      fields.push([null, f]);
      form.append(f.node);
    }
    const result = el("div", { class: "result" });
    const button = el("button", { type: "submit", text: "Answer" });
    form.append(button, result);
    const key = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      let value;
      try {
        if (fields.length === 1 && fields[0][0] === null) value = fields[0][1].read();
        else value = Object.fromEntries(fields.map(([n, f]) => [n, f.read()]));
      } catch (err) {
        result.className = "result bad";
        result.textContent = `Not valid JSON: ${err.message}`;
        return;
      }
      button.disabled = true;
      const resp = await fetch(`${api}/input`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ value, node: request.node, key }),
      });
      const body = await resp.json().catch(() => ({}));
      if (resp.ok) {
        result.className = "result";
        result.textContent = `Answered; the run is ${body.status}.`;
        if (!stream && !TERMINAL.has(status)) open();
        refresh();
      } else {
        button.disabled = false;
        result.className = "result bad";
        result.textContent = (body.error && body.error.message) || `HTTP ${resp.status}`;
      }
    });
    return el("div", { class: "request" },
      el("h2", { text: `Input needed: ${request.node}` }),
      el("p", { class: "prompt", text: request.prompt }), form);
  }

  function renderAsk(run) {
    const box = $("inputs-needed");
    const pending = run.status === "waiting" ? run.pending_inputs : [];
    const names = pending.map((r) => r.node).join("\n");
    if (names === formsFor) return; // keep what the person is typing
    formsFor = names;
    box.textContent = "";
    box.hidden = pending.length === 0;
    for (const request of pending) box.append(askForm(request));
  }

  open();
  refresh();
})();

// The operator's web page: plain JavaScript over the JSON API, no build
// step. Everything shown comes from webhooks or plugins, so it is put on
// the page as text (never as HTML); the Content-Security-Policy forbids
// inline scripts as a second line.
"use strict";

const KEY = "crm-event-handler.admin-key";
const $ = (selector) => document.querySelector(selector);

/** An element with properties and children (strings become text). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const time = (ms) => (ms ? new Date(ms).toLocaleString() : "");
const badge = (state) => el("span", { class: `badge ${state}` }, state);

function say(text, isError = false) {
  const message = $("#message");
  message.textContent = text;
  message.className = isError ? "error" : "";
}

/** Call the API with the admin key; the parsed JSON, or an Error with the API's detail. */
async function api(path, options = {}) {
  const headers = { "x-api-key": sessionStorage.getItem(KEY) || "" };
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => null);
  if (response.status === 401) {
    signOut("The admin key was refused.");
    throw new Error("the admin key was refused");
  }
  if (!response.ok) throw new Error((body && body.detail) || `HTTP ${response.status}`);
  return body;
}

// Signing in and out.

async function signIn(event) {
  event.preventDefault();
  const key = $("#admin-key").value;
  const response = await fetch("/api/v1/destinations", { headers: { "x-api-key": key } });
  if (!response.ok) {
    $("#login-error").textContent =
      response.status === 401 ? "That key is not the admin key." : `The service answered ${response.status}.`;
    return;
  }
  sessionStorage.setItem(KEY, key);
  $("#admin-key").value = "";
  start();
}

function signOut(why = "") {
  sessionStorage.removeItem(KEY);
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = why;
}

// Views.

const views = { receipts: loadReceipts, dead: loadDeadLetters, destinations: loadDestinations, plugins: loadPlugins };

function show(view) {
  for (const button of document.querySelectorAll("nav button")) {
    button.classList.toggle("current", button.dataset.view === view);
  }
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  say("");
  views[view]().catch((e) => say(e.message, true));
}

// Receipts.

let nextReceipts = null;

async function loadReceipts(more = false) {
  const query = new URLSearchParams({ limit: "50" });
  const reference = $("#search-reference").value.trim();
  const state = $("#search-state").value;
  if (reference) query.set("reference", reference);
  if (state) query.set("state", state);
  if (more && nextReceipts) query.set("cursor", nextReceipts);
  const page = await api(`/api/v1/receipts?${query}`);
  const body = $("#receipts tbody");
  if (!more) {
    body.replaceChildren();
    $("#receipt-detail").replaceChildren();
  }
  for (const receipt of page.receipts) {
    body.append(
      el(
        "tr",
        { class: "receipt", onclick: () => showReceipt(receipt.id).catch((e) => say(e.message, true)) },
        el("td", {}, time(receipt.received_at_ms)),
        el("td", {}, receipt.provider),
        el("td", { class: "reference" }, receipt.reference),
        el("td", {}, receipt.status),
        el("td", {}, receipt.actions.map((a) => el("span", { class: "action" }, `${a.destination} `, badge(a.state)))),
      ),
    );
  }
  if (!more && page.receipts.length === 0) {
    body.append(el("tr", {}, el("td", { colspan: "5" }, reference ? `No receipt for deal ${reference}.` : "No receipts yet.")));
  }
  nextReceipts = page.next;
  $("#receipts-more").hidden = !page.next;
  // One deal found: show it at once.
  if (!more && reference && page.receipts.length === 1) await showReceipt(page.receipts[0].id);
}

async function showReceipt(id) {
  const receipt = await api(`/api/v1/receipts/${encodeURIComponent(id)}`);
  const detail = $("#receipt-detail");
  detail.replaceChildren(
    el("h2", {}, `Deal ${receipt.reference} — ${receipt.status}`),
    el("p", { class: "muted" }, `Receipt ${receipt.id}, from ${receipt.provider}, received ${time(receipt.received_at_ms)}`),
    ...receipt.actions.map(actionSection),
  );
  detail.scrollIntoView({ block: "nearest" });
}

function actionSection(action) {
  const rows = (action.log || []).map((attempt) =>
    el(
      "tr",
      { class: `attempt ${attempt.outcome}` },
      el("td", {}, attempt.attempt),
      el("td", {}, time(attempt.started_at_ms)),
      el("td", {}, `${attempt.duration_ms} ms`),
      el("td", { class: "outcome" }, attempt.outcome),
      el("td", { class: "status" }, attempt.status ?? ""),
      el("td", {}, attempt.plugin_version),
      el(
        "td",
        {},
        attempt.requests.map((r) =>
          el(
            "details",
            {},
            el("summary", {}, `${r.method} ${r.url} → ${r.response_status ?? r.error ?? r.denied ?? ""}`),
            el("pre", {}, r.body_excerpt),
            r.response_excerpt ? el("pre", { class: "response" }, r.response_excerpt) : null,
          ),
        ),
        attempt.detail,
        attempt.shadow ? shadowNote(attempt.shadow) : null,
      ),
    ),
  );
  return el(
    "section",
    { class: "action-detail", "data-destination": action.destination },
    el("h3", {}, `${action.destination} · ${action.action} `, badge(action.state), ` ${action.attempts} attempt(s)`),
    action.last_error ? el("p", { class: "error" }, action.last_error) : null,
    rows.length
      ? el(
          "table",
          { class: "attempts" },
          el("thead", {}, el("tr", {}, ["#", "Started", "Took", "Outcome", "HTTP", "Plugin", "Requests"].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows),
        )
      : el("p", { class: "muted" }, "No attempt yet."),
  );
}

/** How a shadow candidate compared with this attempt. */
function shadowNote(shadow) {
  const verdict = shadow.matched ? "matched" : "differed";
  return el(
    "div",
    { class: shadow.matched ? "shadow matched" : "shadow differed" },
    `Shadow ${shadow.candidate} ${shadow.version} ${verdict} (${shadow.outcome})`,
    (shadow.differences || []).length ? el("ul", {}, shadow.differences.map((d) => el("li", {}, d))) : null,
  );
}

// Dead letters.

let shownDeadLetters = [];

async function loadDeadLetters() {
  const destination = $("#dead-destination").value;
  const query = destination ? `?destination=${encodeURIComponent(destination)}` : "";
  const [{ dead_letters: letters }, { destinations }] = await Promise.all([
    api(`/api/v1/dead-letters${query}`),
    api("/api/v1/destinations"),
  ]);
  const select = $("#dead-destination");
  select.replaceChildren(
    el("option", { value: "" }, "every destination"),
    ...destinations.map((d) => el("option", { value: d.name }, d.name)),
  );
  select.value = destination;
  shownDeadLetters = letters;
  const body = $("#dead-letters tbody");
  body.replaceChildren(
    ...letters.map((letter) =>
      el(
        "tr",
        { class: "dead-letter" },
        el("td", {}, time(letter.failed_at_ms)),
        el("td", {}, letter.job.destination),
        el("td", {}, letter.job.action),
        el("td", { class: "reference" }, letter.job.event.reference),
        el("td", { class: "reason" }, letter.reason),
        el("td", {}, el("button", { type: "button", class: "replay", onclick: () => replay([letter.job.id]) }, "Replay")),
      ),
    ),
  );
  if (letters.length === 0) body.append(el("tr", {}, el("td", { colspan: "6" }, "No dead letters.")));
  $("#replay-shown").disabled = letters.length === 0;
}

/** Replay each of `ids`; one that fails (replayed elsewhere meanwhile) does not stop the rest. */
async function replay(ids) {
  let replayed = 0;
  const failed = [];
  for (const id of ids) {
    try {
      const answer = await api("/api/v1/dead-letters/replay", { method: "POST", body: JSON.stringify({ job_id: id }) });
      replayed += answer.replayed.length;
    } catch (e) {
      failed.push(`${id}: ${e.message}`);
    }
  }
  await loadDeadLetters().catch(() => {});
  if (failed.length) say(`${replayed} dead letter(s) queued again; not replayed: ${failed.join("; ")}`, true);
  else say(`${replayed} dead letter(s) queued again.`);
}

function replayShown() {
  const n = shownDeadLetters.length;
  if (n && confirm(`Queue ${n} dead letter(s) again, each with a fresh retry budget?`)) {
    replay(shownDeadLetters.map((l) => l.job.id));
  }
}

// Destinations.

async function loadDestinations() {
  const { destinations } = await api("/api/v1/destinations");
  $("#destinations tbody").replaceChildren(
    ...destinations.map((d) => {
      const paused = d.paused;
      const state = paused
        ? `paused by ${paused.by === "breaker" ? "the circuit breaker" : "an operator"} since ${time(paused.since_ms)}: ${paused.reason}`
        : "running";
      const verb = paused ? "resume" : "pause";
      const limits = [
        d.limits.max_concurrency ? `${d.limits.max_concurrency} at once` : null,
        d.limits.max_per_second ? `${d.limits.max_per_second}/s` : null,
      ].filter(Boolean);
      return el(
        "tr",
        { class: "destination", "data-name": d.name },
        el("td", {}, d.name),
        el("td", {}, d.loaded ? `v${d.version}` : "not loaded"),
        el("td", {}, limits.length ? limits.join(", ") : "none"),
        el("td", { class: paused ? "state paused" : "state" }, state),
        el("td", { class: "waiting" }, d.waiting),
        el("td", {}, el("button", { type: "button", class: verb, onclick: () => steer(d.name, verb) }, paused ? "Resume" : "Pause")),
      );
    }),
  );
}

async function steer(name, verb) {
  try {
    const body = verb === "pause" ? JSON.stringify({ reason: "paused from the web page" }) : undefined;
    await api(`/api/v1/destinations/${encodeURIComponent(name)}/${verb}`, { method: "POST", body });
    say(`${name} ${verb === "pause" ? "paused" : "resumed"}.`);
    await loadDestinations();
  } catch (e) {
    say(e.message, true);
  }
}

// Plugins.

async function loadPlugins() {
  const { plugins, load_errors: errors } = await api("/api/v1/plugins");
  $("#plugins tbody").replaceChildren(
    ...plugins.map((p) =>
      el(
        "tr",
        { class: "plugin" },
        el("td", {}, p.name),
        el("td", {}, p.kind),
        el("td", {}, p.version),
        el("td", { title: p.digest }, p.digest.slice(0, 12)),
        el("td", {}, time(p.loaded_at_ms)),
        el("td", {}, p.grants.join(", ")),
        el("td", { class: p.not_configured.length ? "error" : "" }, p.not_configured.join(", ")),
      ),
    ),
  );
  $("#load-errors").replaceChildren(
    ...(errors.length ? errors.map((e) => el("li", {}, el("code", {}, e.dir), `: ${e.error}`)) : [el("li", {}, "None.")]),
  );
}

// Queue depth and delivery rate, from the public metrics.

let lastDelivered = null;

async function refreshStats() {
  const text = await (await fetch("/metrics")).text();
  const depth = {};
  let delivered = 0;
  for (const line of text.split("\n")) {
    let m = line.match(/^crm_queue_depth\{queue="jobs",state="(\w+)"\} (\d+)/);
    if (m) depth[m[1]] = Number(m[2]);
    m = line.match(/^crm_deliveries_total\{[^}]*outcome="delivered"[^}]*\} (\d+)/);
    if (m) delivered += Number(m[1]);
  }
  const now = Date.now();
  const rate = lastDelivered ? ((delivered - lastDelivered.count) * 1000) / (now - lastDelivered.at) : 0;
  lastDelivered = { count: delivered, at: now };
  $("#stats").textContent =
    `Queue: ${depth.ready ?? 0} ready · ${depth.delayed ?? 0} retrying · ${depth.in_flight ?? 0} in flight · ` +
    `${depth.paused ?? 0} paused · ${depth.dead ?? 0} dead — ${rate.toFixed(1)} deliveries/s`;
}

// Start.

let statsTimer = null;

function start() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  show("receipts");
  refreshStats().catch(() => {});
  clearInterval(statsTimer);
  statsTimer = setInterval(() => refreshStats().catch(() => {}), 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (e) => signIn(e).catch((err) => ($("#login-error").textContent = err.message)));
  $("#sign-out").addEventListener("click", () => signOut());
  for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => show(button.dataset.view));
  $("#search").addEventListener("submit", (e) => {
    e.preventDefault();
    loadReceipts().catch((err) => say(err.message, true));
  });
  $("#receipts-more").addEventListener("click", () => loadReceipts(true).catch((e) => say(e.message, true)));
  $("#dead-destination").addEventListener("change", () => loadDeadLetters().catch((e) => say(e.message, true)));
  $("#replay-shown").addEventListener("click", replayShown);
  if (sessionStorage.getItem(KEY)) start();
  else signOut();
});

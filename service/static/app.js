// corefleet's dashboard: the public API, pushed by GET /v1/events. Only the engines and
// queues table is also read every QUEUES_EVERY_MS: workers coming and going, or an engine
// becoming unreachable, are no job events.
// Every value from the API is rendered with textContent, never as markup.
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "dead"]);
const PAGE = 50; // jobs listed at first, and added by each "Show older"
const MAX_PAGE = 500; // the most one GET /v1/jobs returns
const MAX_PAGES = 40; // requests one listing may take (a rare filter gives short pages)
let wanted = PAGE; // jobs the listing shows: the newest ones, this many at most
const rows = new Map(); // job id -> {tr, job}
let selected = null; // the job id shown in the detail pane
let reloading = false; // a listing is on its way
let changedMeanwhile = false; // events arrived while it was
let reloadTimer = null;
let queuesTimer = null;
const QUEUES_EVERY_MS = 10000;
let queuesEvery = null;

const $ = (id) => document.getElementById(id);

// The API token, when the gateway wants one: asked for once, kept for this tab only.
const TOKEN_KEY = "corefleet-token";

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

class Unauthorized extends Error {}

async function api(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init).catch((error) => {
    // A token no header can carry: ask for another one.
    if (error instanceof TypeError && sessionStorage.getItem(TOKEN_KEY)) askForToken(error.message, true);
    throw error;
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    const message = `${response.status} ${error.code || ""}: ${error.message || response.statusText}`;
    if (response.status === 401) {
      askForToken(message, true);
      throw new Unauthorized(message);
    }
    if (response.status === 403) askForToken(`${message} (an API token may)`, false);
    throw new Error(message);
  }
  return data;
}

// Shows the token form; ``forget``: the token kept is no good, drop it.
function askForToken(why, forget) {
  if (forget) sessionStorage.removeItem(TOKEN_KEY);
  $("login").hidden = false;
  $("login-reason").textContent = why;
  $("change-token").hidden = false;
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function stateCell(state) {
  const td = document.createElement("td");
  const badge = document.createElement("span");
  badge.className = `state state-${state}`;
  badge.textContent = state;
  td.append(badge);
  return td;
}

function progressCell(progress) {
  const td = document.createElement("td");
  td.className = "progress";
  if (progress) {
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = progress.fraction;
    const label = document.createElement("span");
    label.className = "progress-message";
    label.textContent = ` ${Math.round(progress.fraction * 100)}% ${progress.message || ""}`;
    td.append(bar, label);
  }
  return td;
}

const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "");

function render(job) {
  const entry = rows.get(job.id);
  const tr = entry ? entry.tr : document.createElement("tr");
  tr.dataset.id = job.id;
  tr.dataset.state = job.state;
  tr.classList.toggle("selected", job.id === selected);
  tr.replaceChildren(
    cell(job.id, "id"), cell(job.task, "task"), cell(job.engine), cell(job.queue),
    stateCell(job.state), cell(String(job.attempts)), progressCell(job.progress),
    cell(clock(job.created_at)), cell(clock(job.finished_at)),
  );
  rows.set(job.id, { tr, job });
  return tr;
}

let listing = 0; // the newest listing asked for: an older answer is dropped

async function reloadJobs() {
  reloadTimer = null;
  reloading = true;
  changedMeanwhile = false;
  const mine = ++listing;
  try {
    const state = $("state-filter").value;
    // The newest ``wanted`` jobs, page after page: read whole each time, so that a reload
    // after events shows the older jobs the user asked for too, in order.
    const jobs = [];
    let cursor = null;
    for (let pages = 0; pages < MAX_PAGES && jobs.length < wanted; pages++) {
      const query = new URLSearchParams({ limit: String(Math.min(wanted - jobs.length, MAX_PAGE)) });
      if (state) query.set("state", state);
      if (cursor) query.set("cursor", cursor);
      const page = await api("GET", `/v1/jobs?${query}`);
      if (mine !== listing) return;
      jobs.push(...page.jobs);
      cursor = page.next_cursor;
      if (!cursor) break;
    }
    rows.clear();
    const seen = new Set();
    const unique = jobs.filter((job) => !seen.has(job.id) && seen.add(job.id));
    $("jobs").tBodies[0].replaceChildren(...unique.map(render));
    $("jobs-empty").hidden = unique.length > 0;
    $("older").hidden = !cursor;
  } catch (error) {
    console.warn("listing jobs failed", error);
  } finally {
    if (mine === listing) reloading = false;
  }
  if (mine === listing && changedMeanwhile) scheduleReload(); // the page may predate the events
}

function scheduleReload() {
  if (reloading) changedMeanwhile = true;
  else if (reloadTimer === null) reloadTimer = setTimeout(reloadJobs, 200);
}

async function reloadQueues() {
  queuesTimer = null;
  try {
    const { engines, delayed } = await api("GET", "/v1/queues");
    $("delayed").textContent = String(delayed);
    const body = [];
    for (const [name, engine] of Object.entries(engines)) {
      const queues = Object.entries(engine.queues || {});
      if (queues.length === 0) queues.push(["", {}]);
      for (const [queue, numbers] of queues) {
        const tr = document.createElement("tr");
        tr.dataset.engine = name;
        tr.append(
          cell(name), cell(engine.state + (engine.problem ? ` (${engine.problem})` : "")),
          cell(queue), cell(String(numbers.waiting ?? "")), cell(String(numbers.running ?? "")),
          cell(String(numbers.workers ?? "")),
        );
        body.push(tr);
      }
    }
    $("engines").tBodies[0].replaceChildren(...body);
  } catch (error) {
    console.warn("reading the queues failed", error);
  }
}

function scheduleQueues() {
  if (queuesTimer === null) queuesTimer = setTimeout(reloadQueues, 1000);
}

async function reloadTasks() {
  const { tasks } = await api("GET", "/v1/tasks");
  $("task").replaceChildren(
    ...tasks.map((task) => {
      const option = document.createElement("option");
      option.value = task.name;
      option.textContent = `${task.name} (${task.kind})`;
      return option;
    }),
  );
}

async function refreshJob(id) {
  try {
    const job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
    if (rows.has(id)) render(job);
    if (id === selected) showDetail(job);
  } catch (error) {
    console.warn("reading job", id, "failed", error);
  }
}

function onChange(change) {
  scheduleQueues();
  if (reloading) changedMeanwhile = true;
  const entry = rows.get(change.id);
  const filter = $("state-filter").value;
  if (!entry) {
    if (!filter || filter === change.state) scheduleReload();
    return;
  }
  if (filter && filter !== change.state) {
    scheduleReload(); // it left the filtered view
    return;
  }
  const job = entry.job;
  if (change.state !== job.state) job.progress = null; // a new state starts without it
  job.state = change.state;
  if (change.progress) job.progress = change.progress;
  render(job);
  if (TERMINAL.has(change.state) || change.id === selected) refreshJob(change.id);
}

function showDetail(job) {
  selected = job.id;
  for (const { tr } of rows.values()) tr.classList.toggle("selected", tr.dataset.id === job.id);
  $("detail").hidden = false;
  $("detail-id").textContent = job.id;
  $("record").textContent = JSON.stringify(job, null, 2);
  $("cancel").disabled = TERMINAL.has(job.state);
}

function reloadAll() {
  reloadJobs();
  reloadQueues();
  if (selected) refreshJob(selected);
}

function setLive(live, text) {
  $("live").textContent = text;
  $("live").classList.toggle("off", !live);
}

// GET /v1/events, read with fetch (EventSource cannot send a token), and reopened when
// it ends. Each opening reads the page's data again: nothing falls between the two.
let following = false;

async function follow() {
  if (following) return;
  following = true;
  try {
    await followLoop();
  } finally {
    following = false;
  }
}

async function followLoop() {
  let pause = 1000; // before reconnecting; doubles while the stream keeps failing
  for (;;) {
    try {
      let response;
      try {
        response = await fetch("/v1/events", { headers: authHeaders() });
      } catch (error) {
        if (!(error instanceof TypeError && sessionStorage.getItem(TOKEN_KEY))) throw error;
        setLive(false, "needs a token");
        askForToken(`this token cannot be sent: ${error.message}`, true);
        return;
      }
      if (response.status === 401) {
        setLive(false, "needs a token");
        askForToken("401 unauthorized: this gateway needs an API token", true);
        return; // the token form starts it again
      }
      if (!response.ok) throw new Error(`GET /v1/events: ${response.status}`);
      setLive(true, "live");
      pause = 1000;
      reloadAll();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          dispatch(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      console.info("the event stream broke off", error);
    }
    setLive(false, "reconnecting");
    await new Promise((resolve) => setTimeout(resolve, pause));
    pause = Math.min(30000, pause * 2);
  }
}

function dispatch(block) {
  let event = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) event = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (event === "job") onChange(JSON.parse(data));
  else if (event === "resync") reloadAll();
}

function parseField(id, kind) {
  const text = $(id).value.trim() || (kind === "array" ? "[]" : "{}");
  const value = JSON.parse(text);
  const ok = kind === "array" ? Array.isArray(value) : value !== null && typeof value === "object" && !Array.isArray(value);
  if (!ok) throw new Error(`${id} must be a JSON ${kind}`);
  return value;
}

async function submit(event) {
  event.preventDefault();
  const out = $("submit-result");
  out.classList.remove("error");
  try {
    const body = { task: $("task").value, args: parseField("args", "array"), kwargs: parseField("kwargs", "object") };
    if ($("priority").value) body.options = { priority: $("priority").value };
    const job = await api("POST", "/v1/jobs", body);
    out.textContent = `accepted ${job.id}`;
    out.dataset.id = job.id;
  } catch (error) {
    out.textContent = error.message;
    out.classList.add("error");
  }
}

async function cancelSelected() {
  const out = $("cancel-result");
  out.classList.remove("error");
  try {
    const job = await api("DELETE", `/v1/jobs/${encodeURIComponent(selected)}`);
    out.textContent = `${job.id} ${job.state}`;
    showDetail(job);
  } catch (error) {
    out.textContent = error.message;
    out.classList.add("error");
  }
}

function start() {
  reloadTasks().catch((error) => error instanceof Unauthorized || console.warn("reading the tasks failed", error));
  follow();
  if (queuesEvery === null) {
    // Not while the page is hidden, nor while it asks for a token (each 401 would ask again).
    queuesEvery = setInterval(
      () => document.hidden || !$("login").hidden || scheduleQueues(), QUEUES_EVERY_MS,
    );
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("jobs").tBodies[0].addEventListener("click", (event) => {
    const tr = event.target.closest("tr");
    if (!tr) return;
    selected = tr.dataset.id;
    refreshJob(selected);
  });
  $("state-filter").addEventListener("change", () => {
    wanted = PAGE;
    reloadJobs();
  });
  $("older").addEventListener("click", () => {
    wanted += PAGE;
    reloadJobs();
  });
  $("submit-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancelSelected);
  $("change-token").addEventListener("click", () => askForToken("", false));
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("login").hidden = true;
    start();
  });
  start();
});

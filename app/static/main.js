// The page: four views chosen by the URL's hash (#datasets, #training, #curves/<job>, #detect/<job>),
// the datasets and jobs lists they share, and polling while a job is queued or running.

import { askForKey, request, requestPage } from "./api.js";
import { CurvesView } from "./curves.js";
import { DatasetsView } from "./datasets.js";
import { DetectView } from "./detect.js";
import { TrainingView } from "./training.js";

const VIEWS = ["datasets", "training", "curves", "detect"];
const FAST_POLL_MS = 1000; // while a job is queued or running
const SLOW_POLL_MS = 5000;

const $ = (selector) => document.querySelector(selector);
// jobs: the newest page, polled; older: the pages after it that "Show older jobs" loaded; next:
// the path of the page after those (null: there is none).
const state = { datasets: [], jobs: [], older: [], next: null };

const datasets = new DatasetsView($("#view-datasets"), (createdId) => refreshDatasets(createdId));
const training = new TrainingView($("#view-training"), {
  onStarted: (job) => {
    state.jobs = [job, ...state.jobs.filter((j) => j.id !== job.id)];
    showJobs();
    schedulePoll(FAST_POLL_MS);
  },
  onCurves: (id) => go(`curves/${id}`),
  onDetect: (id) => go(`detect/${id}`),
});
const curves = new CurvesView($("#view-curves"));
const detect = new DetectView($("#view-detect"));

function go(hash) {
  location.hash = hash;
}

function route() {
  const [name, arg] = location.hash.slice(1).split("/");
  const view = VIEWS.includes(name) ? name : "datasets";
  for (const v of VIEWS) $(`#view-${v}`).hidden = v !== view;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view === "curves") curves.show(arg);
  if (view === "detect") detect.setJobs(allJobs(), arg);
}

function showError(error) {
  const status = $("#service-status");
  status.textContent = error.message;
  status.classList.add("error");
  if (error.status === 401 && !status.querySelector("button")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "small";
    button.textContent = "Enter API key";
    button.addEventListener("click", async () => (await askForKey()) && refreshAll());
    status.append(" ", button);
  }
}

async function refreshDatasets(createdId) {
  try {
    state.datasets = await request("/datasets");
  } catch (error) {
    return showError(error);
  }
  datasets.setDatasets(state.datasets);
  training.setDatasets(state.datasets, createdId);
}

function allJobs() {
  const newest = new Set(state.jobs.map((job) => job.id));
  return [...state.jobs, ...state.older.filter((job) => !newest.has(job.id))];
}

function showJobs() {
  const jobs = allJobs();
  training.setJobs(jobs);
  curves.setJobs(jobs);
  detect.setJobs(jobs);
  $("#jobs-more").hidden = !state.next;
}

async function refreshJobs() {
  try {
    const page = await requestPage("/jobs");
    state.jobs = page.items;
    if (!state.older.length) state.next = page.next;
  } catch (error) {
    showError(error);
    return false;
  }
  showJobs();
  return true;
}

async function showOlderJobs() {
  try {
    const page = await requestPage(state.next);
    state.older = [...state.older, ...page.items];
    state.next = page.next;
  } catch (error) {
    return showError(error);
  }
  showJobs();
}

async function refreshStatus() {
  const status = $("#service-status");
  try {
    const ready = await request("/readyz");
    // Every worker seen trains on a CPU: both forms offer the CPU demo's settings.
    if (ready.workers.length && ready.workers.every((worker) => worker.device === "cpu")) {
      training.offerCpuDefaults();
      datasets.offerCpuDefaults();
    }
    const workers = ready.workers.length;
    status.textContent = workers
      ? `Ready · ${workers} training worker${workers > 1 ? "s" : ""}`
      : "Ready · no training worker seen: jobs wait in the queue until one starts";
    status.classList.remove("error");
  } catch (error) {
    showError(error);
  }
}

let pollTimer = null;

function schedulePoll(ms) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, ms);
}

async function poll() {
  if (!document.hidden) await refreshJobs();
  const active = state.jobs.some((job) => job.status === "queued" || job.status === "running");
  schedulePoll(active ? FAST_POLL_MS : SLOW_POLL_MS);
}

/** What the server's weights folder holds: the COCO model for Detect, what each init would use. */
async function refreshWeights() {
  try {
    const weights = await request("/weights");
    training.setWeights(weights);
    detect.setWeights(weights);
  } catch (error) {
    showError(error);
  }
}

async function refreshAll() {
  await Promise.all([refreshDatasets(), refreshJobs(), refreshStatus(), refreshWeights()]);
}

async function start() {
  window.addEventListener("hashchange", route);
  $("#jobs-more").addEventListener("click", showOlderJobs);
  // A file dropped beside the drop zone must not make the browser leave the page to show it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
  route();
  try {
    const openapi = await request("/openapi.json");
    training.buildForm(openapi.components.schemas.TrainRequest);
  } catch (error) {
    $("#train-error").textContent = `The training form could not be built: ${error.message}`;
  }
  await refreshAll();
  route();
  schedulePoll(FAST_POLL_MS);
  setInterval(refreshStatus, 15000);
}

start();

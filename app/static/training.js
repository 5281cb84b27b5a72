// The Training view: the POST /train form, built from the API's own schema (its defaults filled in,
// 422 messages shown next to their field), and the jobs list with progress and cancel.

import { fieldOf, request } from "./api.js";
import { setOptions } from "./ui.js";

// Shown first; every other field of the schema goes under "More settings" (but deprecated ones).
const MAIN_FIELDS = ["init", "epochs", "batch_size", "learning_rate", "width_multiplier", "image_size", "val_fraction", "seed"];
const LABELS = {
  init: "Start from",
  patience: "Patience (epochs)",
  epochs: "Epochs",
  batch_size: "Batch size",
  learning_rate: "Learning rate",
  width_multiplier: "Width multiplier",
  image_size: "Image size (px)",
  val_fraction: "Validation fraction",
  seed: "Seed",
  early_block_lr_factor: "Early-block LR factor",
  weight_decay: "Weight decay",
  lr_schedule: "LR schedule",
  warmup_steps: "Warm-up steps",
  device: "Device",
  amp: "Mixed precision (AMP)",
  backbone: "Backbone",
  pretrained_backbone: "Pretrained backbone",
  frozen_layers: "Frozen VGG layers",
  augment: "Augmentation",
  num_workers: "Data-loading workers",
  max_train_images: "Max training images",
};
const HINTS = {
  width_multiplier: "1 is the full SSD300 (pretrained weights need it); 0.25 trains quickly on a CPU. Starting from a job: the job's.",
  backbone: "vgg16 for COCO's weights, a job's own, else vgg16_bn.",
  frozen_layers: "none: 10 from ImageNet or COCO weights, else 0.",
  max_train_images: "none: every training image.",
  patience: "none: every epoch; else stop after this many epochs without a better validation mAP@0.5.",
};
// What the empty choice of a nullable list means.
const NULL_CHOICES = { backbone: "what the weights need" };
// The choices of "Start from" beside the succeeded jobs; their hints say what this server would use.
const INIT_CHOICES = [
  ["auto", "auto: COCO, else ImageNet, else random"],
  ["coco", "COCO-trained SSD300"],
  ["imagenet", "ImageNet backbone"],
  ["scratch", "random weights (scratch)"],
];
const ACTIVE = ["queued", "running"];
// The CPU demo's settings (bench/RESULTS.md, "The CPU demo"): with bf16 on 2 cores they pass validation
// mAP@0.5 0.9 in about 5 minutes on 300 synthetic images, where the full width learns little in 10.
const CPU_DEMO = { epochs: 54, batch_size: 16, width_multiplier: 0.25 };

/** The JSON-schema type of a property, whether it may be null, and its choices (if an enum). */
function describeProperty(prop) {
  const variants = prop.anyOf || [prop];
  const nullable = variants.some((v) => v.type === "null");
  const main = variants.find((v) => v.type !== "null") || {};
  const choices = main.enum || (main.const !== undefined ? [main.const] : null);
  return { type: main.type, nullable, choices, main };
}

function fieldFor(name, prop) {
  const { type, nullable, choices, main } = describeProperty(prop);
  const id = `train-${name}`;
  const wrap = document.createElement("div");
  wrap.className = "field";
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = LABELS[name] || prop.title || name;
  let input;
  if (type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(prop.default);
    wrap.classList.add("check");
  } else if (name === "init") {
    input = document.createElement("select");
    for (const [value, text] of INIT_CHOICES) input.append(new Option(text, value));
    input.value = prop.default ?? "auto";
  } else if (choices) {
    input = document.createElement("select");
    if (nullable) input.append(new Option(NULL_CHOICES[name] || "none", ""));
    for (const choice of choices) input.append(new Option(choice, choice));
    input.value = prop.default ?? "";
  } else {
    input = document.createElement("input");
    const numeric = type === "integer" || type === "number";
    input.type = numeric ? "number" : "text";
    if (numeric) {
      input.step = type === "integer" ? "1" : "any";
      input.inputMode = type === "integer" ? "numeric" : "decimal";
      if (main.minimum !== undefined) input.min = main.minimum;
      if (main.maximum !== undefined) input.max = main.maximum;
    }
    if (nullable) input.placeholder = "none";
    input.value = prop.default ?? "";
  }
  input.id = id;
  input.name = name;
  input.dataset.type = type;
  input.dataset.nullable = nullable;
  if ("default" in prop) input.dataset.default = JSON.stringify(prop.default);
  const error = document.createElement("p");
  error.id = `${id}-error`;
  error.className = "error field-error";
  input.setAttribute("aria-describedby", error.id);
  const hintText = HINTS[name] || prop.description;
  if (hintText) {
    const hint = document.createElement("p");
    hint.id = `${id}-hint`;
    hint.className = "muted hint";
    hint.textContent = hintText;
    input.setAttribute("aria-describedby", `${error.id} ${hint.id}`);
    wrap.append(...(type === "boolean" ? [input, label] : [label, input]), hint, error);
  } else {
    wrap.append(...(type === "boolean" ? [input, label] : [label, input]), error);
  }
  return wrap;
}

/** The request body. Fields left at the server's default (or blank optional numbers) are left out, so the
 * server's rules for unset fields apply: a job's own width when starting from it, for one. */
function formBody(form) {
  const body = {};
  for (const input of form.querySelectorAll("[name]")) {
    const { name, value } = input;
    let entry; // undefined: not sent
    if (input.type === "checkbox") entry = input.checked;
    else if (input.dataset.type === "integer" || input.dataset.type === "number") {
      if (input.validity.badInput) entry = input.value || "not a number";
      else if (value !== "") entry = Number(value);
    } else if (value !== "") entry = value;
    else if (input.dataset.nullable === "true") entry = null;
    const isDefault = "default" in input.dataset && JSON.stringify(entry) === input.dataset.default;
    if (entry !== undefined && !isDefault) body[name] = entry;
  }
  return body;
}

function duration(seconds) {
  if (seconds == null) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

/** The share of the job done (0..1) and a line saying where it is. */
export function progressOf(job) {
  const p = job.progress;
  const done = job.epochs_completed / job.epochs;
  if (job.status === "succeeded") return [1, `${job.epochs} of ${job.epochs} epochs`];
  if (job.status !== "running" || !p) return [done, `${job.epochs_completed} of ${job.epochs} epochs`];
  const fraction = Math.max(done, (p.epoch - 1 + p.step / p.steps_per_epoch) / job.epochs);
  const eta = p.eta_seconds != null ? ` · ETA ${duration(p.eta_seconds)}` : "";
  return [fraction, `epoch ${p.epoch} of ${job.epochs} · step ${p.step} of ${p.steps_per_epoch}${eta}`];
}

/** Where a job's weights start: what was asked, what is used once it started, and why they differ. */
export function startedFrom(job) {
  const asked = job.init ?? job.config?.init;
  if (!asked) return "";
  if (!job.init_used) return `weights: ${asked}`;
  const used = job.init_used === asked ? asked : `${job.init_used} (asked: ${asked})`;
  const backbone = job.backbone ? `, ${job.backbone}` : "";
  return `weights: ${used}${backbone}${job.init_note ? ` · ${job.init_note}` : ""}`;
}

export class TrainingView {
  /** `onStarted(job)` after a job was queued; `onCurves(id)` / `onDetect(id)` open those views. */
  constructor(root, { onStarted, onCurves, onDetect }) {
    this.form = root.querySelector("#train-form");
    this.datasetSelect = root.querySelector("#train-dataset_id");
    this.formError = root.querySelector("#train-error");
    this.list = root.querySelector("#jobs-list");
    this.empty = root.querySelector("#jobs-empty");
    this.listError = root.querySelector("#jobs-error");
    this.items = new Map(); // job id -> its <li>, updated in place so focus stays put while polling
    this.handlers = { onStarted, onCurves, onDetect };
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
  }

  /** Workers that all train on CPUs (GET /readyz): the fields still at the server's default take the CPU
   * demo's values, once (when the form is built), and a note says why. */
  offerCpuDefaults() {
    if (this.cpuOffered || !this.form.querySelector("#train-epochs")) return;
    this.cpuOffered = true;
    for (const [name, value] of Object.entries(CPU_DEMO)) {
      const input = this.form.querySelector(`#train-${name}`);
      if (input && input.value !== "" && JSON.stringify(Number(input.value)) === input.dataset.default) {
        input.value = value;
      }
    }
    this.form.querySelector("#train-cpu-note").hidden = false;
  }

  /** Learned weights fix the width (1, or a job's own): the CPU demo's width, if still there, goes back to the
   * server's default, which the form leaves unset. */
  fitWidthToInit() {
    const init = this.form.querySelector("#train-init").value;
    const width = this.form.querySelector("#train-width_multiplier");
    if (!this.cpuOffered || !width || ["auto", "scratch"].includes(init)) return;
    if (Number(width.value) === CPU_DEMO.width_multiplier) width.value = JSON.parse(width.dataset.default);
  }

  /** Builds the fields from the OpenAPI schema of POST /train's body. */
  buildForm(schema) {
    const properties = Object.fromEntries(Object.entries(schema.properties).filter(([, prop]) => !prop.deprecated));
    delete properties.dataset_id;
    const main = this.form.querySelector("#train-fields");
    const more = this.form.querySelector("#train-more-fields");
    main.replaceChildren(...MAIN_FIELDS.filter((n) => n in properties).map((n) => fieldFor(n, properties[n])));
    more.replaceChildren(
      ...Object.keys(properties)
        .filter((n) => !MAIN_FIELDS.includes(n))
        .map((n) => fieldFor(n, properties[n])),
    );
    this.form.querySelector("#train-init")?.addEventListener("change", () => {
      this.fitWidthToInit();
      this.showInitHint();
    });
    this.showInitHint();
  }

  /** `GET /weights`: what each init would start from on this server. */
  setWeights(weights) {
    this.weights = weights;
    this.showInitHint();
  }

  showInitHint() {
    const select = this.form.querySelector("#train-init");
    const hint = this.form.querySelector("#train-init-hint");
    if (!select || !hint) return;
    const kind = select.value.startsWith("job:") ? "job:<id>" : select.value;
    const uses = this.weights?.inits?.[kind];
    hint.textContent = uses ? `Here: ${uses}.` : "Where the weights start.";
  }

  /** "Start from" offers the fixed choices and every succeeded job's model. */
  setInitJobs(jobs) {
    const select = this.form.querySelector("#train-init");
    if (!select) return;
    const trained = jobs.filter((job) => job.status === "succeeded" && job.has_model);
    const items = [
      ...INIT_CHOICES,
      ...trained.map((job) => [`job:${job.id}`, `job ${job.id} · ${job.dataset_name || job.dataset_id}`]),
    ];
    setOptions(select, items);
  }

  setDatasets(datasets, preferred) {
    const items = datasets.map((d) => [d.id, `${d.name} (${d.num_images} images)`]);
    setOptions(this.datasetSelect, items, { preferred, emptyText: "no datasets yet" });
  }

  clearErrors() {
    this.formError.textContent = "";
    for (const p of this.form.querySelectorAll(".field-error")) p.textContent = "";
    for (const input of this.form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  async submit() {
    this.clearErrors();
    const button = this.form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const job = await request("/train", { method: "POST", json: formBody(this.form) });
      this.handlers.onStarted(job);
    } catch (error) {
      this.showErrors(error);
    } finally {
      button.disabled = false;
    }
  }

  /** FastAPI's 422 list goes next to each field; anything else (a string detail) under the form. */
  showErrors(error) {
    const unplaced = [];
    for (const entry of Array.isArray(error.detail) ? error.detail : []) {
      const input = this.form.querySelector(`[name="${CSS.escape(fieldOf(entry))}"]`);
      if (!input) {
        unplaced.push(`${fieldOf(entry) || "request"}: ${entry.msg}`);
        continue;
      }
      input.setAttribute("aria-invalid", "true");
      const target = this.form.querySelector(`#${input.id}-error`);
      target.textContent = target.textContent ? `${target.textContent}; ${entry.msg}` : entry.msg;
      const details = input.closest("details");
      if (details) details.open = true;
    }
    if (!Array.isArray(error.detail)) unplaced.push(error.message);
    this.formError.textContent = unplaced.join("; ");
    this.form.querySelector("[aria-invalid]")?.focus();
  }

  setJobs(jobs) {
    this.setInitJobs(jobs);
    this.empty.hidden = jobs.length > 0;
    const seen = new Set();
    let previous = null;
    for (const job of jobs) {
      seen.add(job.id);
      let item = this.items.get(job.id);
      if (!item) {
        item = this.createItem(job);
        this.items.set(job.id, item);
      }
      this.updateItem(item, job);
      const expected = previous ? previous.nextSibling : this.list.firstChild;
      if (item !== expected) this.list.insertBefore(item, expected);
      previous = item;
    }
    for (const [id, item] of this.items) {
      if (!seen.has(id)) {
        item.remove();
        this.items.delete(id);
      }
    }
  }

  createItem(job) {
    const item = document.createElement("li");
    item.className = "job card";
    item.dataset.id = job.id;
    item.innerHTML = `
      <div class="job-head"><strong class="job-title"></strong> <span class="badge"></span></div>
      <progress max="1" value="0"></progress>
      <p class="job-progress"></p>
      <p class="job-extra muted"></p>
      <p class="job-init muted"></p>
      <p class="job-note"></p>
      <p class="job-error error"></p>
      <div class="row job-actions">
        <button type="button" class="secondary small" data-action="curves">Curves</button>
        <button type="button" class="secondary small" data-action="detect">Detect</button>
        <button type="button" class="danger small" data-action="cancel">Cancel</button>
      </div>`;
    item.querySelector("progress").setAttribute("aria-label", `Progress of job ${job.id}`);
    item.querySelector("[data-action=curves]").addEventListener("click", () => this.handlers.onCurves(job.id));
    item.querySelector("[data-action=detect]").addEventListener("click", () => this.handlers.onDetect(job.id));
    item.querySelector("[data-action=cancel]").addEventListener("click", () => this.cancel(job.id, item));
    return item;
  }

  updateItem(item, job) {
    const [fraction, where] = progressOf(job);
    item.dataset.status = job.status;
    item.querySelector(".job-title").textContent = `${job.id} · ${job.dataset_name || job.dataset_id}`;
    const badge = item.querySelector(".badge");
    badge.textContent = job.cancel_requested && ACTIVE.includes(job.status) ? `${job.status}, cancelling` : job.status;
    badge.className = `badge ${job.status}`;
    item.querySelector("progress").value = fraction;
    item.querySelector(".job-progress").textContent = where;
    const extra = [`created ${new Date(job.created_at).toLocaleString()}`];
    if (job.best_val_loss != null) extra.push(`best val loss ${job.best_val_loss.toPrecision(4)}`);
    if (job.config?.width_multiplier != null) extra.push(`width ${job.config.width_multiplier}`);
    if (job.device) extra.push(job.precision ? `${job.device} ${job.precision}` : job.device);
    item.querySelector(".job-extra").textContent = extra.join(" · ");
    item.querySelector(".job-init").textContent = startedFrom(job);
    item.querySelector(".job-note").textContent = job.note || "";
    item.querySelector(".job-error").textContent = job.error || "";
    item.querySelector("[data-action=detect]").hidden = !job.has_model;
    const cancel = item.querySelector("[data-action=cancel]");
    cancel.hidden = !ACTIVE.includes(job.status);
    cancel.disabled = Boolean(job.cancel_requested);
  }

  async cancel(jobId, item) {
    this.listError.textContent = "";
    try {
      this.updateItem(item, await request(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }));
    } catch (error) {
      this.listError.textContent = error.message;
    }
  }
}

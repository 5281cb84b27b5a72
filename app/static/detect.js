// The Detect view: pick a trained model (or the COCO-trained one, before any training), drop or choose an
// image, see its boxes. The image is sent once with a low score threshold; the slider then filters those
// detections here, with no new request.

import { request } from "./api.js";
import { setOptions, svgElement } from "./ui.js";

const REQUEST_THRESHOLD = 0.05; // the slider's minimum: nothing below it was asked for
const COCO = "coco"; // the model choice that is no job: POST /detect?model=coco
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0f9b8e", "#f032e6", "#9a6324"];

export class DetectView {
  constructor(root) {
    this.model = root.querySelector("#detect-model");
    this.noModel = root.querySelector("#detect-no-model");
    this.zone = root.querySelector("#dropzone");
    this.fileInput = root.querySelector("#detect-file");
    this.error = root.querySelector("#detect-error");
    this.slider = root.querySelector("#score-threshold");
    this.sliderValue = root.querySelector("#score-threshold-value");
    this.count = root.querySelector("#detect-count");
    this.figure = root.querySelector("#detect-figure");
    this.image = root.querySelector("#detect-image");
    this.stage = root.querySelector("#detect-figure .stage");
    this.overlay = root.querySelector("#detect-overlay");
    this.json = root.querySelector("#detect-json");
    this.result = null;
    this.imageUrl = null;
    this.jobs = [];
    this.cocoModel = false;
    this.slider.min = REQUEST_THRESHOLD;
    this.slider.addEventListener("input", () => this.draw());
    this.fileInput.addEventListener("change", () => this.fileInput.files[0] && this.detect(this.fileInput.files[0]));
    this.zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      this.zone.classList.add("over");
    });
    this.zone.addEventListener("dragleave", () => this.zone.classList.remove("over"));
    this.zone.addEventListener("drop", (event) => {
      event.preventDefault();
      this.zone.classList.remove("over");
      const file = event.dataTransfer?.files[0];
      if (file) this.detect(file);
    });
  }

  /** The jobs whose model can answer, newest first, then the COCO model where the server has its weights;
   * keeps the one picked (or picks `preferred`). */
  setJobs(jobs, preferred) {
    this.jobs = jobs;
    const trained = jobs.filter((job) => job.has_model);
    const items = trained.map((job) => {
      const loss = job.best_val_loss != null ? ` · val loss ${job.best_val_loss.toPrecision(3)}` : "";
      return [job.id, `${job.id} · ${job.dataset_name || job.dataset_id} · ${job.epochs_completed} epochs${loss}`];
    });
    if (this.cocoModel) items.push([COCO, "COCO-trained SSD300 · 80 everyday categories · no training needed"]);
    setOptions(this.model, items, { preferred, emptyText: "no trained model yet" });
    this.noModel.hidden = items.length > 0;
  }

  /** `GET /weights`: offers the COCO model when its weights are on the server. */
  setWeights(weights) {
    this.cocoModel = Boolean(weights?.coco_model);
    this.setJobs(this.jobs);
  }

  async detect(file) {
    this.error.textContent = "";
    const body = new FormData();
    body.append("file", file);
    const query = new URLSearchParams({ score_threshold: REQUEST_THRESHOLD, max_detections: 100 });
    if (this.model.value === COCO) query.set("model", COCO);
    else if (this.model.value) query.set("job_id", this.model.value);
    this.count.textContent = "detecting…";
    try {
      const result = await request(`/detect?${query}`, { method: "POST", body });
      if (this.imageUrl) URL.revokeObjectURL(this.imageUrl);
      this.imageUrl = URL.createObjectURL(file);
      this.image.src = this.imageUrl;
      this.image.alt = `${file.name}, with the detected boxes drawn`;
      this.result = result;
      this.json.textContent = JSON.stringify(result, null, 2);
      this.figure.hidden = false;
      this.draw();
    } catch (error) {
      this.count.textContent = "";
      this.error.textContent = error.message;
    }
  }

  /** Draws the detections at or above the slider's threshold over the image. */
  draw() {
    const threshold = Number(this.slider.value);
    this.sliderValue.textContent = threshold.toFixed(2);
    this.overlay.replaceChildren();
    if (!this.result) return;
    const { width, height } = this.result.image;
    this.stage.style.setProperty("--aspect", width / height);
    // Positions in percent of the image, so the boxes follow the image's displayed size; labels stay
    // in CSS pixels (a nested <svg> at the box's corner), readable at any size.
    const pct = (value, size) => `${((100 * value) / size).toFixed(3)}%`;
    const kept = this.result.detections.filter((d) => d.score >= threshold);
    // Lowest score first, so the most confident boxes and labels end up on top.
    for (const d of [...kept].reverse()) {
      const [x1, y1, x2, y2] = d.box;
      const colour = COLOURS[d.class_id % COLOURS.length];
      const group = svgElement("g", { class: "detection", "data-label": d.label, "data-score": d.score }, this.overlay);
      group.style.setProperty("--colour", colour);
      svgElement("rect", { class: "box", x: pct(x1, width), y: pct(y1, height), width: pct(x2 - x1, width), height: pct(y2 - y1, height) }, group);
      const corner = svgElement("svg", { x: pct(x1, width), y: pct(y1, height), overflow: "visible" }, group);
      const inside = y1 < height * 0.08; // no room above the box: write inside it
      svgElement("text", { x: 3, y: inside ? 13 : -4, class: "label" }, corner).textContent = `${d.label} ${d.score.toFixed(2)}`;
    }
    const total = this.result.detections.length;
    this.count.textContent = `${kept.length} of ${total} detections with score ≥ ${threshold.toFixed(2)}`;
  }
}

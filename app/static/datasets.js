// The Datasets view: the list, a zip upload with a progress bar, a synthetic dataset.

import { request, upload } from "./api.js";

const summary = (d) => `${d.name}: ${d.num_images} images, ${d.num_boxes} boxes, classes ${d.classes.join(", ")}`;

export class DatasetsView {
  /** `onChange(createdId)` after a dataset was added or removed. */
  constructor(root, onChange) {
    this.onChange = onChange;
    this.body = root.querySelector("#datasets-table tbody");
    this.empty = root.querySelector("#datasets-empty");
    this.error = root.querySelector("#datasets-error");
    this.setupUpload(root.querySelector("#upload-form"));
    this.setupSynthetic(root.querySelector("#synthetic-form"));
  }

  setDatasets(datasets) {
    this.empty.hidden = datasets.length > 0;
    this.body.replaceChildren(
      ...datasets.map((d) => {
        const row = document.createElement("tr");
        row.dataset.id = d.id;
        for (const value of [d.name, d.format.toUpperCase(), d.num_images, d.num_boxes, d.classes.join(", ")]) {
          row.insertCell().textContent = value;
        }
        const remove = document.createElement("button");
        remove.type = "button";
        remove.className = "secondary small";
        remove.textContent = "Delete";
        remove.setAttribute("aria-label", `Delete dataset ${d.name}`);
        remove.addEventListener("click", () => this.remove(d));
        row.insertCell().append(remove);
        return row;
      }),
    );
  }

  async remove(dataset) {
    if (!confirm(`Delete dataset ${dataset.name}? Its files are removed.`)) return;
    this.error.textContent = "";
    try {
      await request(`/datasets/${encodeURIComponent(dataset.id)}`, { method: "DELETE" });
      this.onChange(null);
    } catch (error) {
      this.error.textContent = error.message;
    }
  }

  setupUpload(form) {
    const progressLine = form.querySelector("#upload-progress-line");
    const progress = form.querySelector("#upload-progress");
    const percent = form.querySelector("#upload-percent");
    const message = form.querySelector("#upload-message");
    const error = form.querySelector("#upload-error");
    const button = form.querySelector("button");
    const show = (fraction) => {
      progress.value = fraction;
      percent.textContent = fraction < 1 ? `${Math.round(fraction * 100)}%` : "100%: importing…";
    };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      message.textContent = error.textContent = "";
      const file = form.elements.file.files[0];
      if (!file) {
        error.textContent = "Choose a .zip file first.";
        return;
      }
      const body = new FormData();
      body.append("file", file);
      if (form.elements.name.value.trim()) body.append("name", form.elements.name.value.trim());
      button.disabled = true;
      progressLine.hidden = false;
      show(0);
      try {
        const dataset = await upload("/datasets", body, show);
        message.textContent = `Imported ${summary(dataset)}.`;
        form.reset();
        this.onChange(dataset.id);
      } catch (failure) {
        error.textContent = failure.message; // the server's detail, verbatim
      } finally {
        button.disabled = false;
        progressLine.hidden = true;
      }
    });
  }

  /** Workers that all train on CPUs: the synthetic dataset's size becomes the CPU demo's (300, beside
   * training.js's CPU_DEMO), once. */
  offerCpuDefaults() {
    const input = document.querySelector("#synthetic-num-images");
    if (this.cpuOffered) return;
    this.cpuOffered = true;
    if (input.value === input.defaultValue) input.value = "300";
  }

  setupSynthetic(form) {
    const message = form.querySelector("#synthetic-message");
    const error = form.querySelector("#synthetic-error");
    const button = form.querySelector("button");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      message.textContent = error.textContent = "";
      button.disabled = true;
      try {
        const json = { num_images: Number(form.elements.num_images.value), seed: Number(form.elements.seed.value) };
        const dataset = await request("/datasets/synthetic", { method: "POST", json });
        message.textContent = `Generated ${summary(dataset)}.`;
        this.onChange(dataset.id);
      } catch (failure) {
        error.textContent = failure.message;
      } finally {
        button.disabled = false;
      }
    });
  }
}

// Live learning curves: a job's epochs from GET /jobs/{id}/losses/stream (history first, then live),
// kept by epoch so a reconnect that replays epochs never duplicates a point.

import { request, streamUrl } from "./api.js";
import { drawChart } from "./chart.js";
import { setOptions } from "./ui.js";

const RETRY_MS = 2000;

/**
 * Follows a job's loss stream: `onEpoch(record)` per epoch (possibly again for one already seen),
 * `onEnd(job)` once the job has ended, `onState(text)` for the connection's state. `.close()` stops.
 * EventSource reconnects by itself after a dropped connection (sending Last-Event-ID); when it gives
 * up (an HTTP error), this asks again after the last epoch it has.
 */
export function followLosses(jobId, { onEpoch, onEnd, onState }) {
  const path = `/jobs/${encodeURIComponent(jobId)}/losses/stream`;
  let source = null;
  let timer = null;
  let closed = false;
  let last = 0;

  const close = () => {
    closed = true;
    clearTimeout(timer);
    source?.close();
  };

  const retry = async () => {
    try {
      await request(`/jobs/${encodeURIComponent(jobId)}`); // asks for an API key if that is what failed
    } catch (error) {
      if (error.status === 404) return onState("this job no longer exists");
    }
    if (!closed) open();
  };

  const open = () => {
    source = new EventSource(streamUrl(path, last ? { after: last } : {}));
    source.addEventListener("open", () => onState("live"));
    source.addEventListener("epoch", (event) => {
      const record = JSON.parse(event.data);
      last = Math.max(last, record.epoch);
      onEpoch(record);
    });
    source.addEventListener("status", (event) => {
      close(); // the server ends the stream after this event; EventSource would reconnect otherwise
      onEnd(JSON.parse(event.data));
    });
    source.addEventListener("error", () => {
      if (closed) return;
      onState("connection lost: reconnecting…");
      if (source.readyState === EventSource.CLOSED) timer = setTimeout(retry, RETRY_MS);
    });
  };

  open();
  return { close };
}

const number = (value, digits = 4) => (value == null ? "–" : Number(value).toPrecision(digits));

/** The Curves view: a job picker, the two charts, the newest epoch's AP@0.5 per class and a table of the numbers. */
export class CurvesView {
  constructor(root) {
    this.select = root.querySelector("#curves-job");
    this.state = root.querySelector("#curves-state");
    this.lossChart = root.querySelector("#chart-loss");
    this.mapChart = root.querySelector("#chart-map");
    this.tableBody = root.querySelector("#curves-table tbody");
    this.perClassTable = root.querySelector("#per-class-table");
    this.perClassEpoch = root.querySelector("#per-class-epoch");
    this.perClassEmpty = root.querySelector("#per-class-empty");
    this.jobId = null;
    this.epochs = new Map(); // epoch -> record: a replayed epoch replaces, never duplicates
    this.follower = null;
    this.job = null;
    this.select.addEventListener("change", () => this.show(this.select.value));
    // Redrawn at the charts' new width (also when the view is first shown): text keeps its size.
    let width = 0;
    new ResizeObserver(([entry]) => {
      if (Math.round(entry.contentRect.width) !== width) {
        width = Math.round(entry.contentRect.width);
        this.draw();
      }
    }).observe(this.lossChart);
  }

  /** Keeps the job picker in step with the jobs list (newest first). */
  setJobs(jobs) {
    const items = jobs.map((job) => [job.id, `${job.id} · ${job.dataset_name || job.dataset_id} · ${job.status}`]);
    setOptions(this.select, items, { preferred: this.jobId, emptyText: "no jobs yet" });
    const current = jobs.find((j) => j.id === this.jobId);
    if (current) this.job = current;
  }

  /** Shows a job (or, with none given, the one picked or else the newest). */
  show(jobId) {
    jobId ||= this.jobId || this.select.options[0]?.value || "";
    if (jobId === this.jobId && this.follower) return;
    this.follower?.close();
    this.follower = null;
    this.jobId = jobId || null;
    this.select.value = jobId;
    this.epochs.clear();
    this.draw();
    if (!jobId) {
      this.state.textContent = "";
      return;
    }
    this.state.textContent = "connecting…";
    this.follower = followLosses(jobId, {
      onEpoch: (record) => {
        this.epochs.set(record.epoch, record);
        this.draw();
      },
      onEnd: (job) => {
        this.job = job;
        this.state.textContent = `job ${job.status || "ended"}`;
        this.draw();
      },
      onState: (text) => {
        this.state.textContent = text;
      },
    });
  }

  draw() {
    const records = [...this.epochs.values()].sort((a, b) => a.epoch - b.epoch);
    const points = (key) => records.filter((r) => r[key] != null).map((r) => [r.epoch, r[key]]);
    const epochs = this.job?.id === this.jobId ? this.job.epochs : 1;
    drawChart(this.lossChart, {
      epochs,
      series: [
        { key: "train_loss", label: "train loss", points: points("train_loss") },
        { key: "val_loss", label: "val loss", points: points("val_loss") },
      ],
    });
    drawChart(this.mapChart, {
      epochs,
      yRange: [0, 1],
      series: [{ key: "val_map50", label: "val mAP@0.5", points: points("val_map50") }],
    });
    this.tableBody.replaceChildren(
      ...records.map((r) => {
        const row = document.createElement("tr");
        for (const value of [r.epoch, number(r.train_loss), number(r.val_loss), number(r.val_map50, 3), number(r.lr, 3), number(r.seconds, 3)]) {
          row.insertCell().textContent = value;
        }
        return row;
      }),
    );
    this.drawPerClass(records);
  }

  /** The newest validated epoch's AP@0.5 per class (`val_ap50_per_class`): a bar and a number each. */
  drawPerClass(records) {
    const newest = records.filter((r) => r.val_ap50_per_class).at(-1);
    const perClass = newest?.val_ap50_per_class || {};
    // The model's class order when the job is known (an object's integer-like keys would come first).
    const known = (this.job?.id === this.jobId && this.job.classes) || [];
    const labels = [...known.filter((c) => c in perClass), ...Object.keys(perClass).filter((c) => !known.includes(c))];
    this.perClassEpoch.textContent = newest ? `(epoch ${newest.epoch})` : "";
    this.perClassTable.hidden = labels.length === 0;
    this.perClassEmpty.hidden = labels.length > 0;
    this.perClassEmpty.textContent = records.length
      ? "None in these epochs (no validation split)."
      : "None yet: each validated epoch brings them.";
    this.perClassTable.tBodies[0].replaceChildren(
      ...labels.map((label) => {
        const row = document.createElement("tr");
        row.dataset.label = label;
        const name = document.createElement("th");
        name.scope = "row";
        name.textContent = label;
        const cell = document.createElement("td");
        const ap = perClass[label];
        if (ap == null) {
          cell.textContent = "–";
          cell.title = "no boxes of this class in the validation split";
        } else {
          const bar = document.createElement("span");
          bar.className = "bar";
          bar.setAttribute("aria-hidden", "true");
          const fill = document.createElement("span");
          fill.style.width = `${(100 * Math.min(1, Math.max(0, ap))).toFixed(1)}%`;
          bar.append(fill);
          cell.append(bar, number(ap, 3));
        }
        cell.dataset.value = ap ?? "";
        row.append(name, cell);
        return row;
      }),
    );
  }
}

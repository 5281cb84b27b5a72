// The HTTP API (shared/design/API.md), with the optional API key: sent as X-API-Key, asked for
// once when a request answers 401, and kept in localStorage.

const KEY_STORAGE = "ssd-api-key";
const MAX_KEY_PROMPTS = 3;

export class ApiError extends Error {
  constructor(status, detail) {
    super(describe(status, detail));
    this.status = status;
    this.detail = detail;
  }
}

/** The server's `detail` as a person reads it: a string as is, FastAPI's 422 list joined. */
function describe(status, detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${fieldOf(d) || "request"}: ${d.msg}`).join("; ");
  return `the server answered ${status}`;
}

/** The body field a 422 entry is about (`loc` is ["body", "epochs"] or ["query", ...]). */
export function fieldOf(error) {
  const loc = error?.loc || [];
  return loc.length > 1 ? String(loc[1]) : "";
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

let asking = null; // one prompt shared by every request that got a 401 meanwhile
let declined = false; // the person closed the prompt: ask again only through askForKey()

/** Shows the key form; resolves to the key given ("" when cancelled). */
export function askForKey(refused = false) {
  declined = false;
  asking ??= new Promise((resolve) => {
    const dialog = document.getElementById("key-dialog");
    const input = dialog.querySelector("#key-input");
    dialog.querySelector("#key-refused").hidden = !refused;
    input.value = "";
    dialog.returnValue = "";
    dialog.addEventListener(
      "close",
      () => {
        const key = dialog.returnValue === "ok" ? input.value.trim() : "";
        if (key) localStorage.setItem(KEY_STORAGE, key);
        declined = !key;
        asking = null;
        resolve(key);
      },
      { once: true },
    );
    dialog.showModal();
  });
  return asking;
}

/** Runs `send(key)` (which resolves to {status, data}), asking for a key on a 401; the data or an ApiError. */
async function withKey(send) {
  let key = apiKey();
  for (let prompts = 0; ; prompts++) {
    const { status, data } = await send(key);
    if (status === 401 && !declined && prompts < MAX_KEY_PROMPTS) {
      const given = await askForKey(Boolean(key));
      if (given) {
        key = given;
        continue;
      }
    }
    if (status < 200 || status >= 300) throw new ApiError(status, data?.detail);
    return data;
  }
}

async function parse(response) {
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : { detail: (await response.text()) || response.statusText };
}

/** A JSON request: `json` is sent as the body; `body` (FormData) as is. */
export function request(path, { method = "GET", json, body } = {}) {
  return withKey(async (key) => {
    const response = await send(path, key, { method, json, body });
    return { status: response.status, data: await parse(response) };
  });
}

/** One page of a listing: `{items, next}`, `next` the path of the following page (its Link header) or null. */
export function requestPage(path) {
  return withKey(async (key) => {
    const response = await send(path, key, {});
    const data = await parse(response);
    const link = /<([^>]+)>;\s*rel="next"/.exec(response.headers.get("link") || "");
    return { status: response.status, data: response.ok ? { items: data, next: link ? link[1] : null } : data };
  });
}

function send(path, key, { method = "GET", json, body }) {
  const headers = {};
  if (json !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers["X-API-Key"] = key;
  const payload = json !== undefined ? JSON.stringify(json) : body;
  return fetch(path, { method, headers, body: payload });
}

/** POST a FormData with XMLHttpRequest, for its upload progress: `onProgress(fraction)`. */
export function upload(path, form, onProgress) {
  return withKey(
    (key) =>
      new Promise((resolve, reject) => {
        const xhr = new XMLHttpRequest();
        xhr.open("POST", path);
        if (key) xhr.setRequestHeader("X-API-Key", key);
        xhr.responseType = "json";
        xhr.upload.addEventListener("progress", (e) => e.lengthComputable && onProgress(e.loaded / e.total));
        xhr.addEventListener("load", () => resolve({ status: xhr.status, data: xhr.response }));
        xhr.addEventListener("error", () => reject(new ApiError(0, "the upload failed: the connection was lost")));
        xhr.send(form);
      }),
  );
}

/** A URL for EventSource, which cannot send headers: the key goes in the query as `api_key`. */
export function streamUrl(path, params = {}) {
  const query = new URLSearchParams(params);
  const key = apiKey();
  if (key) query.set("api_key", key);
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

// The admin API as the console calls it: the token (kept for this tab in sessionStorage) sent as Bearer, JSON in
// and out, and every answer that is not 2xx turned into an ApiError carrying the API's `error`, `field`, `line`
// and `failures`.

const KEY = "playbus.console.token";

export function token() {
  return sessionStorage.getItem(KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, body, method, path) {
    const doc = body && typeof body === "object" ? body : {};
    super(typeof doc.error === "string" ? doc.error : `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.method = method;
    this.path = path;
    this.field = typeof doc.field === "string" ? doc.field : null;
    this.line = Number.isInteger(doc.line) ? doc.line : null;
    this.failures = Array.isArray(doc.failures) ? doc.failures : [];
  }
}

let unauthorized = null;

/** What to do when the server refuses the token (401): the console asks for another one. */
export function onUnauthorized(fn) {
  unauthorized = fn;
}

/**
 * Call the API. `body`: an object sent as JSON, or with `{text: true}` a string sent as text (a Lua source).
 * Resolves to the parsed JSON answer; rejects with an ApiError (status 0 when the server did not answer).
 */
export async function api(method, path, body, options = {}) {
  const headers = { Authorization: `Bearer ${token()}`, Accept: "application/json" };
  let payload;
  if (body !== undefined) {
    if (options.text) {
      payload = body;
      headers["Content-Type"] = "text/plain; charset=utf-8";
    } else {
      payload = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, { error: `the server did not answer (${e.message})` }, method, path);
  }
  const raw = await resp.text();
  let doc = null;
  if (raw) {
    try {
      doc = JSON.parse(raw);
    } catch {
      doc = { error: `HTTP ${resp.status} ${resp.statusText}: ${raw.slice(0, 300)}` };
    }
  }
  if (!resp.ok) {
    const err = new ApiError(resp.status, doc, method, path);
    if (resp.status === 401 && unauthorized && !options.quiet401) unauthorized(err);
    throw err;
  }
  return doc;
}

/** A path segment, percent-encoded (a user id may hold "/" or "%"). */
export const seg = (s) => encodeURIComponent(String(s));

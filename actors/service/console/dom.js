// Small DOM helpers: elements built from data (text only: what the API answers is never parsed as markup),
// labelled form fields, tables, readable errors, number and time formats.

let counter = 0;

/** A fresh element id with this prefix. */
export function uid(prefix = "f") {
  counter += 1;
  return `${prefix}-${counter}`;
}

/**
 * h("button", {type: "button", onclick: fn, class: "x"}, "text", child, [more]): an element. Attributes whose
 * value is null, undefined or false are left out; `true` sets an empty attribute; `value` and `checked` set the
 * property, after the children (so that a select's options exist first).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  const late = {};
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "value" || k === "checked" || k === "selected") late[k] = v;
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  add(el, children);
  Object.assign(el, late);
  return el;
}

function add(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

/** A labelled form control: <div class="field"><label for=id>label</label> control <small>hint</small></div>. */
export function field(label, control, hint) {
  if (!control.id) control.id = uid("f");
  const out = h("div", { class: "field" }, h("label", { for: control.id }, label), control);
  if (hint) {
    const hintId = uid("hint");
    control.setAttribute("aria-describedby", hintId);
    out.append(h("small", { id: hintId }, hint));
  }
  return out;
}

/** A select of these options ([value, label] pairs or plain values). */
export function select(options, value, attrs = {}) {
  const opts = options.map((o) => {
    const [v, label] = Array.isArray(o) ? o : [o, o];
    return h("option", { value: String(v) }, String(label));
  });
  return h("select", { ...attrs, value: value === undefined ? undefined : String(value) }, opts);
}

/** A section with a heading of its own (h2), labelled by it. */
export function section(title, ...children) {
  const id = uid("s");
  return h("section", { "aria-labelledby": id, class: "panel" }, h("h2", { id }, title), children);
}

/**
 * A table: columns are header labels; rows are arrays of cells (text or nodes). `empty`: the sentence shown when
 * there is no row.
 */
export function table(columns, rows, { caption, empty = "Nothing to show.", numeric = [] } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  const num = new Set(numeric);
  return h("div", { class: "scroll" },
    h("table", {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, columns.map((c, i) => h("th", { scope: "col", class: num.has(i) ? "num" : null }, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) => h(i === 0 ? "th" : "td",
        { scope: i === 0 ? "row" : null, class: num.has(i) ? "num" : null }, c)))))));
}

/** A description list of [term, value] pairs. */
export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

const REASONS = {
  0: "no answer", 400: "Bad request", 401: "Unauthorized", 404: "Not found", 405: "Method not allowed",
  409: "Conflict", 413: "Too large", 422: "Not accepted", 429: "Busy", 503: "Temporarily unavailable",
};

/** An error, readable: the API's status, its `error`, the `field` or `line` it names, the failing test vectors. */
export function errorBox(err, what) {
  const box = h("div", { class: "error", role: "alert" });
  if (err && err.name === "ApiError") {
    const status = err.status ? `${err.status} ${REASONS[err.status] || ""}`.trim() : "No answer";
    box.append(h("p", {}, h("strong", {}, what ? `${what}: ${status}` : status),
      err.method ? h("span", { class: "where" }, ` (${err.method} ${err.path})`) : null));
    box.append(h("p", { class: "message" }, err.message));
    if (err.field) box.append(h("p", {}, "Field: ", h("code", {}, err.field)));
    if (err.line !== null && err.line > 0) box.append(h("p", {}, `Line: ${err.line}`));
    if (err.failures.length) {
      box.append(h("p", {}, `Test vectors that fail (${err.failures.length}):`),
        h("ul", { class: "failures" }, err.failures.map((f) => h("li", {}, h("pre", {}, f)))));
    }
    if (err.status === 503) box.append(h("p", {}, "The server says to retry in a moment."));
  } else {
    box.append(h("p", {}, h("strong", {}, what || "Something went wrong")),
      h("p", { class: "message" }, String(err && err.message ? err.message : err)));
  }
  return box;
}

/** Run `work` with the button disabled and marked busy; errors land in `out` (replacing what it showed). */
export async function busy(button, out, work) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await work();
  } catch (e) {
    if (out) out.replaceChildren(errorBox(e));
    return undefined;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

/** Say something to screen readers (a polite live region). */
export function announce(text) {
  const el = document.getElementById("announce");
  if (el) el.textContent = text;
}

export const num = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : String(n ?? ""));

/** Milliseconds since the epoch as "YYYY-MM-DD HH:MM:SS UTC". */
export function when(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "";
  return `${new Date(ms).toISOString().replace("T", " ").slice(0, 19)} UTC`;
}

export const json = (v) => JSON.stringify(v);

/** JSON text for a value, indented (for config and context views). */
export const pretty = (v) => JSON.stringify(v, null, 2);

/** Parse the JSON an operator typed; an Error naming the field when it does not parse. */
export function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} is not valid JSON: ${e.message}`);
  }
}

/** Actions as compact text lines: "lottery.grant_chance {"chances":1}". */
export function actionList(actions) {
  if (!actions || !actions.length) return h("span", { class: "muted" }, "none");
  return h("ul", { class: "plain" }, actions.map((a) => h("li", {}, h("code", {}, a.type), " ", json(a.params ?? {}))));
}

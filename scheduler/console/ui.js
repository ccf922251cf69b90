// What the frame and the pages share: who is signed in, the API calls (every one
// signed once a key is imported), the elements pages are built of, and a way for a
// page to have itself drawn again after a change.

import { parseExact, signRequest } from "./sign.js";

const enc = new TextEncoder();

export const session = { identity: null, whoami: null };

// An answer that is not 2xx, with the API's own code and message.
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Calls the control API: `target` is a path with its query; `body` a value sent
// as JSON. Answers the decoded JSON (`exact`: numbers as written, see sign.js).
export async function api(method, target, body, { exact = false } = {}) {
  const bytes = body === undefined ? new Uint8Array() : enc.encode(JSON.stringify(body));
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (session.identity) {
    Object.assign(headers, await signRequest(session.identity, method, target, bytes));
  }
  const res = await fetch(target, {
    method,
    headers,
    body: body === undefined ? undefined : bytes,
    cache: "no-store",
    credentials: "omit",
  });
  const text = await res.text();
  let value = null;
  if (text) {
    try {
      value = exact ? parseExact(text) : JSON.parse(text);
    } catch (_) {
      value = { error: { code: "bad_answer", message: text.slice(0, 200) } };
    }
  }
  if (!res.ok) {
    const e = (value && value.error) || {};
    throw new ApiError(res.status, e.code || String(res.status), e.message || res.statusText);
  }
  return value;
}

// ---- building the page -----------------------------------------------------------

// An element: h("td", {class: "x"}, "text", child, ...). Text is always text.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// A table of `rows` (arrays of cells) under `head`, or `empty` when there are none.
export function table(head, rows, empty = "none") {
  if (rows.length === 0) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))),
  );
}

export function link(href, text) {
  return h("a", { href }, text);
}

export function badge(text) {
  return h("span", { class: `badge s-${String(text).replace(/[^a-z_]/g, "")}` }, text);
}

export function when(ms) {
  if (ms === undefined || ms === null) return "-";
  return new Date(Number(ms)).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

// ---- drawing again ---------------------------------------------------------------

let redraw = async () => {};

// How the page on view is drawn again; the frame (console.js) sets it once.
export function setRedraw(f) {
  redraw = f;
}

// Draws the page on view again, from a fresh answer.
export function refresh() {
  return redraw();
}

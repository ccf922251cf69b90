// The console's frame: the key page, the routes between pages, and live updates
// (the page on view is read again every two seconds and redrawn when its answer
// changed). What pages share with it is ui.js's.

import { forgetIdentity, importIdentity, loadIdentity } from "./sign.js";
import { PAGES } from "./pages.js";
import { api, h, link, refresh, session, setRedraw, table } from "./ui.js";

const REFRESH_MS = 2000;

// ---- routes and refresh ----------------------------------------------------------

// The page on view and the answer it was drawn from.
let shown = { route: null, key: null };
let timer = null;

function pageOf(name) {
  return name === "key" ? keyPage : PAGES[name] || PAGES.cluster;
}

function route() {
  const path = location.hash.replace(/^#\/?/, "").split("?")[0];
  const parts = (path || "cluster").split("/");
  return { page: parts[0], args: parts.slice(1).map(decodeURIComponent) };
}

async function render({ quiet }) {
  const r = route();
  const page = pageOf(r.page);
  const main = document.getElementById("main");
  const status = document.getElementById("status");
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.getAttribute("href") === `#/${r.page}`);
  }
  const routeKey = location.hash;
  try {
    const data = page.needsKey && !session.identity ? null : await page.load(...r.args);
    const key = JSON.stringify(data, (_, v) => (v && v.raw !== undefined ? v.raw : v));
    if (location.hash !== routeKey) return;
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.className = "";
    // Redraw only what changed, so a reader's place and a half-typed field stay.
    if (quiet && shown.route === routeKey && shown.key === key) return;
    shown = { route: routeKey, key };
    main.replaceChildren(
      data === null && page.needsKey ? signInFirst() : page.view(data, ...r.args),
    );
  } catch (e) {
    if (location.hash !== routeKey) return;
    status.textContent = `${e.status || ""} ${e.code || "error"}: ${e.message}`;
    status.className = "failed";
    if (!quiet || shown.route !== routeKey) {
      shown = { route: routeKey, key: null };
      main.replaceChildren(failure(e));
    }
  }
}

setRedraw(() => render({ quiet: false }));

function failure(e) {
  const hint =
    e.status === 401
      ? [" Import an identity key the cluster knows: ", link("#/key", "your key"), "."]
      : e.status === 403
        ? " Your identity has no role here that allows this."
        : "";
  return h("div", { class: "failure" }, h("strong", {}, `${e.status || ""} ${e.code || ""}`), " ",
    e.message, hint);
}

function signInFirst() {
  return h("div", { class: "failure" }, "This page reads what only members may see. ",
    link("#/key", "Import your identity key"), " first.");
}

async function whoami() {
  const who = document.getElementById("who");
  session.whoami = null;
  if (!session.identity) {
    who.replaceChildren(link("#/key", "import a key"));
    return;
  }
  try {
    session.whoami = await api("GET", "/api/v1/whoami");
  } catch (_) {
    // Shown on the key page; the header names the key in any case.
  }
  who.replaceChildren(link("#/key", `${session.identity.name} (${session.identity.id.slice(0, 8)})`));
}

// ---- the key page --------------------------------------------------------------

export const keyPage = {
  needsKey: false,
  live: false,
  async load() {
    if (!session.identity) return { identity: null };
    try {
      return { identity: session.identity.id, whoami: await api("GET", "/api/v1/whoami") };
    } catch (e) {
      return { identity: session.identity.id, whoamiError: `${e.status} ${e.code}: ${e.message}` };
    }
  },
  view(data) {
    const message = h("p", { id: "key-message" });
    const text = h("textarea", {
      id: "key-file",
      rows: 7,
      spellcheck: "false",
      placeholder: '{"name": ..., "id": ..., "public_key": "ed25519:...", "secret_key": "ed25519:..."}',
    });
    const file = h("input", { type: "file", id: "key-upload", accept: ".json,application/json" });
    const take = async (contents) => {
      try {
        session.identity = await importIdentity(contents);
        text.value = "";
        await whoami();
        await refresh();
      } catch (e) {
        message.textContent = e.message;
        message.className = "failed";
      }
    };
    file.addEventListener("change", async () => {
      if (file.files[0]) await take(await file.files[0].text());
    });
    const held = session.identity
      ? [
          h("h2", {}, "Signed in"),
          table(["name", "identity", "public key"], [
            [session.identity.name, h("code", {}, session.identity.id),
              h("code", {}, session.identity.publicKey)],
          ]),
          data.whoami
            ? h("pre", { id: "whoami" }, JSON.stringify(data.whoami, null, 2))
            : h("p", { class: "failed" }, data.whoamiError || ""),
          h("button", {
            id: "forget-key",
            onclick: async () => {
              await forgetIdentity();
              session.identity = null;
              await whoami();
              await refresh();
            },
          }, "Forget this key"),
        ]
      : [];
    return h(
      "section",
      {},
      held,
      h("h2", {}, session.identity ? "Use another key" : "Import your identity key"),
      h("p", {}, "Choose or paste the identity file `aigrid key new` wrote (",
        h("code", {}, "~/.config/aigrid/identity.json"), "). The key is kept in this browser, ",
        "cannot be read back out of it, and signs every request this console sends."),
      file,
      text,
      h("div", {}, h("button", { id: "import-key", onclick: () => take(text.value) }, "Import")),
      message,
    );
  },
};

// ---- start -----------------------------------------------------------------------

async function start() {
  try {
    session.identity = await loadIdentity();
  } catch (_) {
    session.identity = null;
  }
  await whoami();
  window.addEventListener("hashchange", () => {
    shown = { route: null, key: null };
    refresh();
  });
  await refresh();
  clearInterval(timer);
  timer = setInterval(() => {
    if (pageOf(route().page).live !== false) render({ quiet: true });
  }, REFRESH_MS);
}

start();

// The console's entry: the admin token, the sections (#/campaigns, #/scripts, #/explain, #/operations) and
// a banner for anything that goes wrong, so that the page is never left blank.

import { api, onUnauthorized, setToken, token } from "./api.js";
import * as campaigns from "./campaigns.js";
import { errorBox, h } from "./dom.js";
import * as explain from "./explain.js";
import * as operations from "./operations.js";
import * as scripts from "./scripts.js";

const SECTIONS = { campaigns, scripts, explain, operations };
const TITLES = { campaigns: "Campaigns", scripts: "Scripts", explain: "Explain a user", operations: "Operations" };

const $ = (id) => document.getElementById(id);
let leave = null; // what the shown view does when it is left (stop polling)
let rendering = 0;

function banner(text) {
  const b = $("banner");
  b.replaceChildren(h("p", {}, h("strong", {}, "The page met a problem: "), text),
    h("button", { type: "button", class: "quiet", onclick: () => { b.hidden = true; } }, "Dismiss"));
  b.hidden = false;
}

window.addEventListener("error", (e) => banner(e.message || "an error in the page"));
window.addEventListener("unhandledrejection", (e) => banner(e.reason && e.reason.message ? e.reason.message : String(e.reason)));

function showLogin(err) {
  if (leave) leave();
  leave = null;
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("view").hidden = true;
  $("login").hidden = false;
  $("login-error").replaceChildren(err ? errorBox(err, "The token was refused") : "");
  $("token").value = "";
  $("token").focus();
}

function showApp() {
  $("login").hidden = true;
  $("nav").hidden = false;
  $("logout").hidden = false;
  $("view").hidden = false;
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map((p) => {
    try {
      return decodeURIComponent(p);
    } catch {
      return p;
    }
  });
  return { section: parts[0] || "campaigns", params: parts.slice(1) };
}

async function render() {
  if (!token()) {
    showLogin();
    return;
  }
  showApp();
  if (leave) leave();
  leave = null;
  const { section, params } = route();
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.section === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const view = SECTIONS[section];
  const main = $("view");
  const mine = ++rendering;
  main.replaceChildren();
  document.title = `${TITLES[section] || "Not found"} · playbus console`;
  if (!view) {
    main.append(h("h1", { tabindex: "-1" }, "No such page"), h("p", {}, h("a", { href: "#/campaigns" }, "Go to the campaigns")));
  } else {
    const loading = h("p", { class: "muted loading", role: "status" }, "Loading…");
    main.append(loading);
    try {
      const cleanup = await view.render(main, params);
      loading.remove();
      if (mine !== rendering) {
        if (typeof cleanup === "function") cleanup();
        return;
      }
      leave = typeof cleanup === "function" ? cleanup : null;
    } catch (e) {
      loading.remove();
      if (mine === rendering) main.append(errorBox(e, `The ${TITLES[section].toLowerCase()} page could not be shown`));
    }
  }
  if (mine === rendering) {
    const heading = main.querySelector("h1");
    if (heading) {
      heading.setAttribute("tabindex", "-1");
      heading.focus({ preventScroll: true });
    }
  }
}

async function signIn(e) {
  e.preventDefault();
  const value = $("token").value.trim();
  const out = $("login-error");
  if (!value) {
    out.replaceChildren(h("p", { class: "error", role: "alert" }, "Give the admin token."));
    return;
  }
  setToken(value);
  const button = e.target.querySelector("button");
  button.disabled = true;
  try {
    await api("GET", "/v1/campaigns", undefined, { quiet401: true });
    out.replaceChildren();
    await render();
  } catch (err) {
    setToken("");
    out.replaceChildren(errorBox(err, "The token was refused"));
    $("token").focus();
  } finally {
    button.disabled = false;
  }
}

onUnauthorized((err) => {
  setToken("");
  showLogin(err);
});

$("login-form").addEventListener("submit", signIn);
$("logout").addEventListener("click", () => {
  setToken("");
  showLogin();
});
window.addEventListener("hashchange", render);
// The address's fragment is the route: the skip link moves the focus instead of following "#view".
document.querySelector(".skip").addEventListener("click", (e) => {
  e.preventDefault();
  $("view").focus();
});
$("loading").remove();
render();

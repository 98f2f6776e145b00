// Explain a user: for (campaign, user), the committed context, the pending timers and the decisions newest
// first, each with its rule, script version, actions, refusals, context changes, effects and error.

import { api, seg } from "./api.js";
import { actionList, facts, field, h, json, num, section, select, table, when } from "./dom.js";

export async function render(root, params) {
  const [campaign = "", user = ""] = params;
  root.append(h("h1", {}, user ? `Explain ${user} in ${campaign}` : "Explain a user"));
  let ids = [];
  try {
    ids = (await api("GET", "/v1/campaigns")).campaigns.map((c) => c.id);
  } catch (e) {
    if (e.status === 401) throw e;
  }
  const which = ids.length ? select(ids, campaign || ids[0]) : h("input", { type: "text", required: true, value: campaign });
  const who = h("input", { type: "text", required: true, autocomplete: "off", value: user });
  const limit = h("input", { type: "number", min: 1, max: 100, step: 1, value: "50", inputmode: "numeric" });
  const form = h("form", { class: "inline", novalidate: true }, field("Campaign", which), field("User", who),
    field("Decisions", limit, "newest first, at most 100"), h("button", { type: "submit" }, "Explain"));
  const out = h("div");
  root.append(form, out);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!who.value.trim()) {
      out.replaceChildren(h("p", { class: "error", role: "alert" }, "Give a user id."));
      who.focus();
      return;
    }
    const next = `#/explain/${seg(which.value)}/${seg(who.value.trim())}`;
    if (location.hash === next) show(out, which.value, who.value.trim(), limit.value);
    else location.hash = next;
  });
  if (campaign && user) await show(out, campaign, user, limit.value);
}

async function show(out, campaign, user, limit) {
  const [c, u] = [seg(campaign), seg(user)];
  const [ctx, dec] = await Promise.all([api("GET", `/v1/campaigns/${c}/users/${u}/context`),
    api("GET", `/v1/campaigns/${c}/users/${u}/decisions?limit=${Number(limit) || 50}`)]);
  const keys = Object.keys(ctx.context).sort();
  out.replaceChildren(
    section("Context", table(["Key", "Value"], keys.map((k) => [h("code", {}, k), h("code", {}, json(ctx.context[k]))]),
      { empty: "Empty: playbus has no committed context for this user." })),
    section("Pending timers", table(["Key", "Fires", "Event type", "Event id"], ctx.timers.map((t) => [t.key ?? "(no key)", when(t.due), h("code", {}, t.type), h("code", {}, t.id)]),
      { empty: "No timer is pending." })),
    section(`Decisions, newest first (${num(dec.decisions.length)})`, dec.decisions.length
      ? h("ol", { class: "decisions" }, dec.decisions.map(decision))
      : h("p", { class: "empty" }, "No rule has run for this user (or its journal no longer holds the runs).")));
}

function decision(d) {
  const outcome = d.error ? ["error", "bad"] : d.actions.length ? ["granted", "ok"] : (d.refused || []).length ? ["refused", "warn"] : ["no action", "muted-badge"];
  const changes = Object.entries(d.changes || {});
  return h("li", { class: "decision" },
    h("h3", {}, h("span", { class: `badge ${outcome[1]}` }, outcome[0]), ` rule ${d.rule} v${d.script_version} on event `, h("code", {}, d.event)),
    facts([
      ["When (event time)", when(d.ts)],
      ["Actions", actionList(d.actions)],
      (d.refused || []).length ? ["Refused", h("ul", { class: "plain" }, d.refused.map((r) => h("li", {}, h("code", {}, r.type), ` ${json(r.params)}: `, r.reason)))] : null,
      ["Context written", changes.length ? h("ul", { class: "plain" }, changes.map(([k, v]) => h("li", {}, h("code", {}, k), ` = ${json(v)}`))) : h("span", { class: "muted" }, "nothing")],
      (d.effects || []).length ? ["Effects", h("ul", { class: "plain" }, d.effects.map((x) => h("li", {}, effect(x))))] : null,
      d.error ? ["Error", h("pre", { class: "bad" }, d.error)] : null,
    ].filter(Boolean)));
}

function effect(x) {
  if ("send" in x) return `sent ${x.type} to ${x.send} (${x.id})`;
  if ("later" in x) return `timer ${x.later}: ${x.type} at ${when(x.due)} (${x.id})`;
  if ("cancel" in x) return `cancelled timer ${x.cancel}${x.id ? ` (${x.id})` : " (none was pending)"}`;
  if ("fired" in x) return `this event is timer ${x.fired}, fired`;
  if ("replay" in x) return `the replay of failed run ${x.replay}`;
  return json(x);
}

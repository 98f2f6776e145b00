// Campaigns: the list, and one campaign with its live stats (polled every few seconds and plotted over time),
// pause and resume, budget top-ups, its rules and its configuration.

import { api, seg } from "./api.js";
import { lineChart } from "./chart.js";
import { announce, busy, errorBox, facts, field, h, num, parseJson, pretty, section, select, table, when } from "./dom.js";

/** Seconds between two stats polls: 5, or ?poll=N in the page's address (1 to 60). */
export const POLL_S = Math.min(60, Math.max(1, Number.parseInt(new URLSearchParams(location.search).get("poll"), 10) || 5));
const KEEP = 720; // points kept per campaign (an hour at 5 s)
const history = new Map(); // campaign id -> [{t, grants: {type: n}, spent: {name: n}, total: {name: n}}]

export async function render(root, params) {
  if (params.length) return detail(root, params[0]);
  root.append(h("h1", {}, "Campaigns"));
  const { campaigns } = await api("GET", "/v1/campaigns");
  root.append(section("Running campaigns", table(["Campaign", "State", "Window", "Rules", "Budgets"],
    campaigns.map((c) => [
      h("a", { href: `#/campaigns/${seg(c.id)}` }, c.id),
      stateBadge(c.paused),
      `${c.starts} to ${c.ends} (${c.timezone})`,
      c.rules.map((r) => r.id).join(", ") || "none",
      c.budgets.map((b) => b.name).join(", ") || "none",
    ]), { empty: "No campaign runs yet." })));
  root.append(creator());
}

function stateBadge(paused) {
  return h("span", { class: paused ? "badge warn" : "badge ok" }, paused ? "paused" : "running");
}

function creator() {
  const id = h("input", { type: "text", required: true, pattern: "[A-Za-z0-9_][A-Za-z0-9_\\-]*", autocomplete: "off" });
  const starts = new Date().toISOString().slice(0, 10);
  const doc = h("textarea", { rows: 12, spellcheck: "false", class: "code" });
  doc.value = pretty({ timezone: "UTC", starts: `${starts}T00:00:00+00:00`, ends: `${starts.slice(0, 4) * 1 + 1}${starts.slice(4)}T00:00:00+00:00`,
    rules: [], caps: [], budgets: [] });
  const out = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Create or replace");
  const form = h("form", { novalidate: true }, field("Campaign id", id, "letters, digits, _ and -"),
    field("Campaign (JSON, the shape of one campaigns item; scripts by name)", doc), button, out);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, out, async () => {
      if (!id.value.trim()) throw new Error("Give the campaign id.");
      const body = parseJson(doc.value, "The campaign");
      const saved = await api("PUT", `/v1/campaigns/${seg(id.value.trim())}`, body);
      location.hash = `#/campaigns/${seg(saved.id)}`;
    });
  });
  return h("details", { class: "panel" }, h("summary", {}, "Create a campaign"), form);
}

async function detail(root, id) {
  const doc = await api("GET", `/v1/campaigns/${seg(id)}`);
  const badge = h("span", {}, stateBadge(doc.paused));
  root.append(h("h1", {}, `Campaign ${id} `, badge));
  root.append(h("p", { class: "muted" }, `${doc.starts} to ${doc.ends} (${doc.timezone}) · `,
    h("a", { href: `#/explain/${seg(id)}` }, "explain a user of this campaign")));

  // pause / resume
  const switchOut = h("div", { "aria-live": "polite" });
  let paused = doc.paused;
  const toggle = h("button", { type: "button" }, paused ? "Resume the campaign" : "Pause the campaign");
  toggle.addEventListener("click", () => busy(toggle, switchOut, async () => {
    if (!paused && !window.confirm(`Pause ${id}? Its events are applied with no rule run until it is resumed.`)) return;
    const r = await api("POST", paused ? `/v1/campaigns/${seg(id)}/resume` : `/v1/campaigns/${seg(id)}/pause`);
    paused = r.paused;
    badge.replaceChildren(stateBadge(paused));
    toggle.textContent = paused ? "Resume the campaign" : "Pause the campaign";
    switchOut.replaceChildren(h("p", { class: "ok" }, paused ? "Paused: rules do not run (a kill switch)." : "Resumed: rules run again."));
    announce(paused ? `${id} paused` : `${id} resumed`);
  }));
  root.append(h("div", { class: "actions" }, toggle, switchOut));

  // live stats
  const updated = h("p", { class: "muted", "aria-live": "off" });
  const statsErr = h("div");
  const live = h("div", { class: "stats" });
  const plots = h("div", { class: "plots" });
  root.append(section("Live stats", updated, statsErr, live));
  root.append(section("Over time", h("p", { class: "muted" }, `Polled every ${POLL_S} s while this page is open.`), plots));

  // top-up
  if (doc.budgets.length) root.append(topUp(id, doc.budgets, () => poll(false)));

  // rules, caps, configuration
  root.append(section("Rules", table(["Rule", "On", "Script", "Emits", "Sends"], doc.rules.map((r) => [
    r.id, h("code", {}, r.on), h("a", { href: `#/scripts/${seg(r.script)}` }, r.script),
    r.emits.join(", ") || "none", r.sends.join(", ") || "none"]), { empty: "No rule." }),
  table(["Cap", "Action", "Per user", "Period"], doc.caps.map((c) => [c.id, c.action, num(c.per_user), c.period]),
    { empty: "No cap." })));
  root.append(configEditor(id, doc));

  let timer = null;
  let stopped = false;
  async function poll(again = true) {
    try {
      const s = await api("GET", `/v1/campaigns/${seg(id)}/stats`);
      if (stopped) return;
      statsErr.replaceChildren();
      record(id, s);
      live.replaceChildren(...statsView(s));
      plots.replaceChildren(...charts(id));
      updated.textContent = `Updated ${when(Date.now())}.`;
      if (s.paused !== paused) {
        paused = s.paused;
        badge.replaceChildren(stateBadge(paused));
        toggle.textContent = paused ? "Resume the campaign" : "Pause the campaign";
      }
    } catch (e) {
      if (!stopped) statsErr.replaceChildren(errorBox(e, "The stats could not be read"));
    } finally {
      if (again && !stopped) timer = setTimeout(poll, POLL_S * 1000);
    }
  }
  await poll();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function record(id, s) {
  const points = history.get(id) || [];
  const spent = {};
  const total = {};
  for (const [name, b] of Object.entries(s.budgets)) {
    spent[name] = b.spent;
    total[name] = b.total;
  }
  points.push({ t: Date.now(), grants: { ...s.grants }, spent, total });
  if (points.length > KEEP) points.splice(0, points.length - KEEP);
  history.set(id, points);
}

function statsView(s) {
  const budgets = Object.entries(s.budgets);
  const out = [];
  out.push(h("h3", {}, "Budgets"), table(["Budget", "Total", "Spent", "Left", "Used"], budgets.map(([name, b]) => {
    const pct = b.total > 0 ? Math.min(100, (100 * b.spent) / b.total) : 0;
    return [name, num(b.total), num(b.spent), num(b.left),
      h("span", {}, h("meter", { min: 0, max: 100, low: 75, high: 90, optimum: 0, value: pct, "aria-label": `${name} used` }), ` ${pct.toFixed(1)}%`)];
  }), { empty: "This campaign has no budget.", numeric: [1, 2, 3] }));
  out.push(h("div", { class: "columns" },
    h("div", {}, h("h3", {}, "Grants"), table(["Action type", "Granted"],
      Object.entries(s.grants).sort().map(([t, n]) => [h("code", {}, t), num(n)]), { empty: "Nothing granted yet.", numeric: [1] })),
    h("div", {}, h("h3", {}, "Refusals"), table(["Refused by", "Refusals"],
      Object.entries(s.refusals).sort().map(([r, n]) => [h("code", {}, r), num(n)]), { empty: "Nothing refused.", numeric: [1] }))));
  const runs = [];
  for (const [rule, versions] of Object.entries(s.rules).sort()) {
    for (const [v, c] of Object.entries(versions).sort((a, b) => a[0] - b[0])) {
      const rate = c.runs ? `${((100 * c.errors) / c.runs).toFixed(1)}%` : "";
      runs.push([rule, `v${v}`, num(c.runs), c.errors ? h("strong", { class: "bad" }, num(c.errors)) : "0", rate]);
    }
  }
  out.push(h("h3", {}, "Rule runs and errors by script version"),
    table(["Rule", "Version", "Runs", "Errors", "Error rate"], runs, { empty: "No rule has run yet.", numeric: [2, 3, 4] }));
  out.push(h("h3", {}, "Delivery"), facts([
    ["Waiting for delivery (backlog)", num(s.delivery.backlog)],
    ["Given up (dead letters)", h("span", {}, num(s.delivery.dead), s.delivery.dead ? [" · ", h("a", { href: "#/operations" }, "redrive")] : "")],
    ["Counted exactly", s.delivery.exact ? "yes" : "no (past the scan limit)"],
  ]));
  return out;
}

function charts(id) {
  const points = history.get(id) || [];
  const types = [...new Set(points.flatMap((p) => Object.keys(p.grants)))].sort();
  const names = [...new Set(points.flatMap((p) => Object.keys(p.spent)))].sort();
  const grants = types.map((t) => ({ name: t, points: points.map((p) => [p.t, p.grants[t] || 0]) }));
  // each budget as the share of its total spent, so that budgets of any size share one scale
  const share = (p, n) => (p.total[n] > 0 ? Math.round((1000 * p.spent[n]) / p.total[n]) / 10 : 0);
  const burn = names.map((n) => {
    const mine = points.filter((p) => n in p.spent);
    const last = mine[mine.length - 1];
    return { name: n, points: mine.map((p) => [p.t, share(p, n)]),
      label: last ? `${n}: ${num(last.spent[n])} of ${num(last.total[n])} spent (${share(last, n)}%)` : `${n}: none` };
  });
  const note = points.length < 2 ? "The plots fill in as the stats are polled." : `${points.length} samples since ${when(points[0].t)}.`;
  return [
    lineChart({ title: "Grants over time (granted so far, by action type)", series: grants, note }),
    lineChart({ title: "Budget burn (share of each budget spent)", series: burn, note, unit: "%", max: 100 }),
  ];
}

function topUp(id, budgets, refresh) {
  const which = select(budgets.map((b) => b.name));
  const amount = h("input", { type: "number", min: 1, step: 1, required: true, inputmode: "numeric" });
  const out = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Top up");
  const form = h("form", { class: "inline", novalidate: true }, field("Budget", which), field("Amount to add", amount, "a whole number"), button);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, out, async () => {
      const n = Number(amount.value);
      if (!Number.isInteger(n) || n < 1) throw new Error("The amount must be a whole number of at least 1.");
      const r = await api("POST", `/v1/campaigns/${seg(id)}/budgets/${seg(which.value)}/topup`, { amount: n });
      out.replaceChildren(h("p", { class: "ok" }, `${r.budget}: the total is now ${num(r.total)}.`));
      amount.value = "";
      refresh();
    });
  });
  return section("Top up a budget", form, out);
}

function configEditor(id, doc) {
  const { paused, ...campaign } = doc;
  const text = h("textarea", { rows: 16, spellcheck: "false", class: "code" });
  text.value = pretty(campaign);
  const out = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Save the campaign");
  const form = h("form", { novalidate: true }, field("The campaign as JSON (rules name their scripts; checked like the configuration file)", text), button, out);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, out, async () => {
      const saved = await api("PUT", `/v1/campaigns/${seg(id)}`, parseJson(text.value, "The campaign"));
      const { paused: _p, ...again } = saved;
      text.value = pretty(again);
      out.replaceChildren(h("p", { class: "ok" }, "Saved: every shard runs it from its next batch."));
    });
  });
  return h("details", { class: "panel" }, h("summary", {}, "Configuration (edit the linkage)"), form);
}

// Operations: failed rule runs and their replay (补单), dead letters and their redrive, the audit log, the shards
// and a rescale.

import { api } from "./api.js";
import { actionList, announce, busy, errorBox, facts, field, h, json, num, section, select, table, when } from "./dom.js";

export async function render(root) {
  root.append(h("h1", {}, "Operations"));
  root.append(h("nav", { "aria-label": "On this page", class: "toc" }, h("ul", {},
    [["failed", "Failed rule runs"], ["dead", "Dead letters"], ["audit", "Audit log"], ["shards", "Shards"]].map(([id, t]) =>
      h("li", {}, h("a", { href: "#/operations", onclick: (e) => jump(e, id) }, t))))));
  let campaigns = [];
  try {
    campaigns = (await api("GET", "/v1/campaigns")).campaigns.map((c) => c.id);
  } catch (e) {
    if (e.status === 401) throw e;
  }
  const stops = [];
  root.append(await failedView(campaigns), await deadView(), await auditView(), await shardsView(stops));
  return () => stops.forEach((f) => f());
}

/** In-page links (the address's fragment is the console's route): scroll to the section and focus its heading. */
function jump(e, id) {
  e.preventDefault();
  const target = document.getElementById(id);
  if (!target) return;
  target.scrollIntoView();
  target.querySelector("h2").focus({ preventScroll: true });
}

function anchored(id, el) {
  el.id = id;
  el.querySelector("h2").setAttribute("tabindex", "-1");
  return el;
}

// -- failed runs -----------------------------------------------------------------------------------------------

async function failedView(campaigns) {
  const list = h("div");
  const campaign = select([["", "any campaign"], ...campaigns]);
  const rule = h("input", { type: "text", autocomplete: "off" });
  const limit = h("input", { type: "number", min: 1, max: 1000, step: 1, value: "50", inputmode: "numeric" });
  const showButton = h("button", { type: "submit" }, "Show failed runs");
  const filter = h("form", { class: "inline", novalidate: true }, field("Campaign", campaign), field("Rule", rule, "empty: every rule"), field("At most", limit), showButton);
  const load = async () => {
    const q = new URLSearchParams({ limit: String(Number(limit.value) || 50) });
    if (campaign.value) q.set("campaign", campaign.value);
    if (rule.value.trim()) q.set("rule", rule.value.trim());
    const { failed } = await api("GET", `/v1/failed?${q}`);
    list.replaceChildren(table(["When", "Campaign", "User", "Event", "Rule", "Version", "Error"], failed.map((f) => [
      when(f.at), f.event.campaign, f.event.user, h("span", {}, h("code", {}, f.event.id), ` ${f.event.type}`), f.rule, `v${f.script_version}`,
      h("code", { class: "bad" }, f.error)]), { empty: "No failed rule run is kept." }));
  };
  filter.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(showButton, list, load);
  });
  await load().catch((e) => { if (e.status === 401) throw e; list.replaceChildren(errorBox(e, "The failed runs could not be read")); });

  const rCampaign = campaigns.length ? select(campaigns) : h("input", { type: "text", required: true });
  const rRule = h("input", { type: "text", autocomplete: "off" });
  const replayButton = h("button", { type: "submit" }, "Replay");
  const out = h("div", { "aria-live": "polite" });
  const replay = h("form", { class: "inline", novalidate: true }, field("Campaign", rCampaign), field("Rule", rRule, "empty: every rule"), replayButton);
  replay.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(replayButton, out, async () => {
      if (!rCampaign.value) throw new Error("Give the campaign whose failed runs to replay.");
      const what = rRule.value.trim() ? `rule ${rRule.value.trim()} of ${rCampaign.value}` : rCampaign.value;
      if (!window.confirm(`Replay the failed runs of ${what} on the active versions? Each runs once; what it grants is granted for real.`)) return;
      const body = { campaign: rCampaign.value };
      if (rRule.value.trim()) body.rule = rRule.value.trim();
      const r = await api("POST", "/v1/failed/replay", body);
      out.replaceChildren(h("div", { role: "status" }, facts([
        ["Found", num(r.found)], ["Replayed", h("strong", {}, num(r.replayed))], ["Failed again", num(r.failed_again)],
        ["Already replayed", num(r.already_replayed)], ["Actions granted", actionList(r.actions)],
        r.errors.length ? ["Errors", h("ul", { class: "plain bad" }, r.errors.map((x) => h("li", {}, `${x.id}: ${x.errors.join("; ")}`)))] : null,
        r.refused.length ? ["Refused", h("ul", { class: "plain" }, r.refused.map((x) => h("li", {}, `${x.id}: ${x.errors.join("; ")}`)))] : null,
        r.more ? ["More", "more failed runs are left: replay again"] : null,
      ].filter(Boolean))));
      announce(`replayed ${r.replayed} of ${r.found}`);
      await load();
    });
  });
  return anchored("failed", section("Failed rule runs", filter, list, h("h3", {}, "Replay"),
    h("p", { class: "muted" }, "Runs each failed run once more on the script's active version: activate a fixed version first. Effects happen exactly once, however often it is run."),
    replay, out));
}

// -- dead letters ----------------------------------------------------------------------------------------------

async function deadView() {
  const list = h("div");
  const target = h("input", { type: "text", autocomplete: "off" });
  const limit = h("input", { type: "number", min: 1, max: 1000, step: 1, value: "50", inputmode: "numeric" });
  const showButton = h("button", { type: "submit" }, "Show dead letters");
  const filter = h("form", { class: "inline", novalidate: true }, field("Target gameplay", target, "e.g. wallet; empty: every one"), field("At most", limit), showButton);
  const out = h("div", { "aria-live": "polite" });
  let boxes = [];
  const load = async () => {
    const q = new URLSearchParams({ limit: String(Number(limit.value) || 50) });
    if (target.value.trim()) q.set("target", target.value.trim());
    const { dead } = await api("GET", `/v1/dead?${q}`);
    boxes = [];
    list.replaceChildren(table(["Select", "Given up", "Target", "Action", "User", "Attempts", "Last error"], dead.map((d) => {
      const a = d.action;
      const box = a ? h("input", { type: "checkbox", value: a.id, "aria-label": `select ${a.id}` }) : h("span", { class: "muted" }, "unreadable");
      if (a) boxes.push(box);
      return [box, when(d.at), d.target, a ? h("span", {}, h("code", {}, a.id), ` ${a.type} ${json(a.params)}`) : h("code", {}, d.raw || ""),
        a ? a.user : "", num(d.attempts), h("code", {}, d.error)];
    }), { empty: "No dead letter." }));
  };
  filter.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(showButton, list, load);
  });
  await load().catch((e) => { if (e.status === 401) throw e; list.replaceChildren(errorBox(e, "The dead letters could not be read")); });
  const redrive = async (body, what) => {
    if (!window.confirm(`Send ${what} again, with their original ids?`)) return;
    const r = await api("POST", "/v1/dead/redrive", body);
    out.replaceChildren(h("p", { class: "ok", role: "status" }, `Redriven: ${num(r.redriven)}.`, r.not_found.length ? ` Not found (already redriven?): ${r.not_found.join(", ")}.` : ""));
    announce(`redriven ${r.redriven}`);
    await load();
  };
  const selected = h("button", { type: "button" }, "Redrive the selected");
  selected.addEventListener("click", () => busy(selected, out, async () => {
    const ids = boxes.filter((b) => b.checked).map((b) => b.value);
    if (!ids.length) throw new Error("Select the dead letters to redrive first.");
    const body = { ids };
    if (target.value.trim()) body.target = target.value.trim();
    await redrive(body, `${ids.length} action${ids.length === 1 ? "" : "s"}`);
  }));
  const all = h("button", { type: "button", class: "secondary" }, "Redrive all");
  all.addEventListener("click", () => busy(all, out, async () => {
    const body = { all: true };
    if (target.value.trim()) body.target = target.value.trim();
    await redrive(body, target.value.trim() ? `every dead letter of ${target.value.trim()}` : "every dead letter");
  }));
  return anchored("dead", section("Dead letters", filter, list, h("div", { class: "actions" }, selected, all), out));
}

// -- audit log -------------------------------------------------------------------------------------------------

async function auditView() {
  const list = h("div");
  const limit = h("input", { type: "number", min: 1, max: 1000, step: 1, value: "50", inputmode: "numeric" });
  const button = h("button", { type: "submit" }, "Show the audit log");
  const form = h("form", { class: "inline", novalidate: true }, field("At most", limit), button);
  const load = async () => {
    const { entries } = await api("GET", `/v1/audit?limit=${Number(limit.value) || 50}`);
    list.replaceChildren(table(["When", "Who", "What", "On", "Detail"], entries.map((e) => [when(e.ts), e.who, h("code", {}, e.action), e.target,
      h("code", { class: "detail" }, json(e.detail))]), { empty: "Nothing was changed yet." }));
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, list, load);
  });
  await load().catch((e) => { if (e.status === 401) throw e; list.replaceChildren(errorBox(e, "The audit log could not be read")); });
  return anchored("audit", section("Audit log", form, list));
}

// -- shards ----------------------------------------------------------------------------------------------------

async function shardsView(stops) {
  const view = h("div");
  const out = h("div", { "aria-live": "polite" });
  let timer = null;
  let stopped = false;
  stops.push(() => { stopped = true; clearTimeout(timer); });
  const load = async () => {
    const m = await api("GET", "/v1/shards");
    view.replaceChildren(facts([
      ["Shards", num(m.count)], ["Asked for", num(m.target)], ["Rescaling", m.rescaling ? "yes" : "no"], ["Map generation", num(m.generation)],
      m.last ? ["Last rescale", h("code", { class: "detail" }, json(m.last))] : null,
    ].filter(Boolean)), table(["Shard", "Key groups"], m.shards.map((s) => [String(s.shard), num(s.groups)]), { numeric: [1] }));
    if (m.rescaling && !stopped) timer = setTimeout(() => load().catch((e) => view.replaceChildren(errorBox(e))), 2000);
    return m;
  };
  await load().catch((e) => { if (e.status === 401) throw e; view.replaceChildren(errorBox(e, "The shard map could not be read")); });
  const count = h("input", { type: "number", min: 1, step: 1, required: true, inputmode: "numeric" });
  const button = h("button", { type: "submit" }, "Rescale");
  const form = h("form", { class: "inline", novalidate: true }, field("Number of shards", count, "whole key groups move while traffic flows"), button);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, out, async () => {
      const n = Number(count.value);
      if (!Number.isInteger(n) || n < 1) throw new Error("The number of shards must be a whole number of at least 1.");
      if (!window.confirm(`Rescale the cluster to ${n} shards?`)) return;
      const r = await api("POST", "/v1/shards", { count: n });
      out.replaceChildren(h("p", { class: "ok", role: "status" }, r.message || `Rescaling to ${n}.`));
      await load();
    });
  });
  return anchored("shards", section("Shards", view, h("h3", {}, "Rescale"), form, out));
}

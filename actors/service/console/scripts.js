// Scripts: the list, and one script: its versions with a diff between any two, an editor that pushes a new
// version (compile errors shown at their line, failing test vectors listed), dry runs on pasted events, a
// backtest against recorded traffic, activation (with a canary share) and rollback.

import { api, seg } from "./api.js";
import { lineDiff, hunks } from "./diff.js";
import { actionList, announce, busy, errorBox, facts, field, h, num, parseJson, pretty, section, select, table, uid, when } from "./dom.js";

const NAME = /^[A-Za-z0-9_][A-Za-z0-9_-]*$/;
const TEMPLATE = "function decide(event, ctx)\n  -- ctx:get(key), ctx:set(key, value), ctx:incr(key, by); emit(type, params)\nend\n";

export async function render(root, params) {
  if (params.length) return detail(root, params[0]);
  root.append(h("h1", {}, "Scripts"));
  const { scripts } = await api("GET", "/v1/scripts");
  root.append(section("Scripts in the catalog", table(["Script", "Active version", "Versions"],
    scripts.map((s) => [h("a", { href: `#/scripts/${seg(s.name)}` }, s.name), `v${s.active}`, s.versions.map((v) => `v${v}`).join(", ")]),
    { empty: "No script yet." })));
  const name = h("input", { type: "text", required: true, autocomplete: "off", pattern: NAME.source });
  const out = h("div");
  const form = h("form", { class: "inline", novalidate: true }, field("Name of a new script", name, "letters, digits, _ and -"),
    h("button", { type: "submit" }, "Write it"), out);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!NAME.test(name.value)) {
      out.replaceChildren(h("p", { class: "error", role: "alert" }, "A script name is made of letters, digits, _ and -, and starts with none of -."));
      return;
    }
    location.hash = `#/scripts/${seg(name.value)}`;
  });
  root.append(section("New script", form));
}

async function detail(root, name) {
  let script = null;
  try {
    script = await api("GET", `/v1/scripts/${seg(name)}`);
  } catch (e) {
    if (e.status !== 404) throw e;
  }
  const { campaigns } = await api("GET", "/v1/campaigns");
  const uses = campaigns.flatMap((c) => c.rules.filter((r) => r.script === name).map((r) => ({ campaign: c, rule: r })));
  root.append(h("h1", {}, `Script ${name}`));
  const summary = h("div");
  root.append(summary);
  const state = { script, name, uses, campaigns, listeners: [], message: null };
  const versionsBox = h("div");
  const activation = h("div");
  const refresh = async () => {
    state.script = await api("GET", `/v1/scripts/${seg(name)}`);
    drawSummary();
    drawVersions();
    drawActivation();
    for (const fn of state.listeners) fn();
  };
  const drawSummary = () => {
    const s = state.script;
    summary.replaceChildren(facts([
      ["Active version", s ? `v${s.active}` : "none: this script is not in the catalog yet; push its version 1 below"],
      ["Canary", s && s.canary ? `v${s.canary.version} for ${s.canary.percent}% of the users` : "none"],
      ["Used by", uses.length ? h("ul", { class: "plain" }, uses.map((u) => h("li", {},
        h("a", { href: `#/campaigns/${seg(u.campaign.id)}` }, u.campaign.id), ` rule ${u.rule.id} on `, h("code", {}, u.rule.on))))
        : "no running campaign"],
    ]));
  };
  const editor = codeEditor(script ? script.source : TEMPLATE);
  const drawVersions = () => versionsBox.replaceChildren(versionsView(state, editor));
  const drawActivation = () => activation.replaceChildren(activationView(state, refresh));
  drawSummary();
  drawVersions();
  drawActivation();
  root.append(section("Versions", versionsBox));
  root.append(section("Edit and push a new version", pushView(state, editor, refresh)));
  root.append(section("Dry run", dryRunView(state, editor)));
  root.append(section("Backtest against recorded traffic", backtestView(state, editor)));
  root.append(section("Activate or roll back", activation));
  return undefined;
}

// -- versions and diff -----------------------------------------------------------------------------------------

async function source(name, version) {
  const r = await api("GET", `/v1/scripts/${seg(name)}?version=${version}`);
  return r.source;
}

function versionsView(state, editor) {
  const s = state.script;
  if (!s) return h("p", { class: "empty" }, "No version yet.");
  const out = h("div", { "aria-live": "polite" });
  const rows = [...s.versions].reverse().map((v) => {
    const load = h("button", { type: "button", class: "quiet" }, `Load v${v} into the editor`);
    load.addEventListener("click", () => busy(load, out, async () => {
      editor.setValue(await source(s.name, v));
      out.replaceChildren(h("p", { class: "ok" }, `v${v} is in the editor.`));
      editor.textarea.focus();
    }));
    const tags = [];
    if (v === s.active) tags.push(h("span", { class: "badge ok" }, "active"));
    if (s.canary && s.canary.version === v) tags.push(h("span", { class: "badge warn" }, `canary ${s.canary.percent}%`));
    return [`v${v}`, h("span", {}, tags), load];
  });
  const versions = s.versions.map((v) => [v, `v${v}`]);
  const newest = s.versions[s.versions.length - 1];
  const older = s.versions.length > 1 ? s.versions[s.versions.length - 2] : newest;
  const from = select(versions, older);
  const to = select(versions, newest);
  const diffOut = h("div");
  const button = h("button", { type: "submit" }, "Show the diff");
  const form = h("form", { class: "inline", novalidate: true }, field("Old version", from), field("New version", to), button);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, diffOut, async () => {
      const [a, b] = await Promise.all([source(s.name, from.value), source(s.name, to.value)]);
      diffOut.replaceChildren(diffView(a, b, `v${from.value}`, `v${to.value}`));
    });
  });
  return h("div", {}, table(["Version", "State", ""], rows), out, h("h3", {}, "Compare two versions"), form, diffOut);
}

function diffView(a, b, labelA, labelB) {
  const lines = lineDiff(a, b);
  const added = lines.filter((l) => l.op === "+").length;
  const removed = lines.filter((l) => l.op === "-").length;
  const head = h("p", { class: "diffstat" }, `${labelA} → ${labelB}: `, h("span", { class: "add" }, `${added} added`), ", ",
    h("span", { class: "del" }, `${removed} removed`));
  if (!added && !removed) return h("div", {}, head, h("p", {}, "The two versions are the same."));
  const rows = hunks(lines).map((l) => {
    if (l.op === "…") return h("tr", { class: "skip" }, h("td", { colspan: 4 }, `… ${l.skipped} unchanged line${l.skipped === 1 ? "" : "s"}`));
    const cls = l.op === "+" ? "add" : l.op === "-" ? "del" : "";
    const sign = l.op === "+" ? "+" : l.op === "-" ? "−" : "";
    return h("tr", { class: cls }, h("td", { class: "ln" }, l.a ?? ""), h("td", { class: "ln" }, l.b ?? ""),
      h("td", { class: "sign" }, sign, l.op === "+" ? h("span", { class: "visually-hidden" }, "added") :
        l.op === "-" ? h("span", { class: "visually-hidden" }, "removed") : null),
      h("td", {}, h("code", {}, l.text)));
  });
  return h("div", { class: "diff" }, head, h("div", { class: "scroll" }, h("table", { class: "diff" },
    h("caption", { class: "visually-hidden" }, `Diff of ${labelA} and ${labelB}`),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, labelA), h("th", { scope: "col" }, labelB), h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "change")), h("th", { scope: "col" }, "line"))),
    h("tbody", {}, rows))));
}

// -- the editor ------------------------------------------------------------------------------------------------

/** A textarea with line numbers beside it; `mark(line)` shows a line as the one in error, `goTo(line)` selects it. */
function codeEditor(initial) {
  const textarea = h("textarea", { class: "code", rows: 18, spellcheck: "false", wrap: "off", autocapitalize: "off" });
  textarea.value = initial;
  const gutter = h("div", { class: "gutter", "aria-hidden": "true" });
  let bad = 0;
  const draw = () => {
    const n = textarea.value.split("\n").length;
    if (gutter.childElementCount !== n || gutter.dataset.bad !== String(bad)) {
      gutter.replaceChildren(...Array.from({ length: n }, (_, i) => h("span", { class: i + 1 === bad ? "bad" : null }, String(i + 1))));
      gutter.dataset.bad = String(bad);
    }
    gutter.scrollTop = textarea.scrollTop;
  };
  textarea.addEventListener("input", draw);
  textarea.addEventListener("scroll", () => { gutter.scrollTop = textarea.scrollTop; });
  const wrap = h("div", { class: "editor" }, gutter, textarea);
  draw();
  return {
    textarea,
    element: wrap,
    value: () => textarea.value,
    setValue(v) {
      textarea.value = v;
      bad = 0;
      draw();
    },
    mark(line) {
      bad = line || 0;
      draw();
    },
    goTo(line) {
      const lines = textarea.value.split("\n");
      const start = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
      const end = start + (lines[line - 1] || "").length;
      textarea.focus();
      textarea.setSelectionRange(start, end);
      const lh = Number.parseFloat(getComputedStyle(textarea).lineHeight) || 20;
      textarea.scrollTop = Math.max(0, (line - 3) * lh);
      draw();
    },
  };
}

function pushView(state, editor, refresh) {
  const label = uid("src");
  editor.textarea.id = label;
  const out = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "button" }, "Push as a new version");
  button.addEventListener("click", () => busy(button, out, async () => {
    editor.mark(0);
    try {
      const r = await api("PUT", `/v1/scripts/${seg(state.name)}`, editor.value(), { text: true });
      out.replaceChildren(h("p", { class: "ok", role: "status" }, `Stored as version ${r.version}: it compiles and passes the script's test vectors. `,
        r.version === 1 ? "As the first version of the script, it is active." : "It is not active yet: activate it below when ready."));
      announce(`stored as version ${r.version}`);
      await refresh();
    } catch (e) {
      const box = errorBox(e, "Not stored");
      if (e.line) {
        editor.mark(e.line);
        const go = h("button", { type: "button", class: "quiet" }, `Go to line ${e.line}`);
        go.addEventListener("click", () => editor.goTo(e.line));
        box.append(go);
      }
      out.replaceChildren(box);
    }
  }));
  return h("div", {}, h("label", { for: label }, "Lua source of the next version"), editor.element,
    h("p", { class: "muted" }, "A push is compiled and run through the script's test vectors first: nothing is stored when either fails."),
    h("div", { class: "actions" }, button), out);
}

// -- dry run ---------------------------------------------------------------------------------------------------

function sampleEvents(state) {
  const use = state.uses[0];
  if (!use) return [{ id: "try-1", campaign: "CAMPAIGN", user: "u1", type: "EVENT.TYPE", data: {} }];
  const starts = Date.parse(use.campaign.starts);
  const ends = Date.parse(use.campaign.ends);
  const ts = Math.min(Math.max(Date.now(), starts), ends - 1);
  return [{ id: "try-1", campaign: use.campaign.id, user: "u-try", type: use.rule.on, ts, data: {} }];
}

/** "the editor's source" or a stored version, as a radio group; returns {element, body()} */
function candidatePicker(state, legend) {
  const group = uid("cand");
  const edited = h("input", { type: "radio", name: group, value: "source", checked: true, id: uid("r") });
  const stored = h("input", { type: "radio", name: group, value: "version", id: uid("r") });
  const version = select([]);
  const fill = () => {
    const s = state.script;
    const keep = version.value;
    version.replaceChildren(...(s ? s.versions : []).map((v) => h("option", { value: String(v) }, `v${v}`)));
    if (s) version.value = s.versions.includes(Number(keep)) ? keep : String(s.versions[s.versions.length - 1]);
    stored.disabled = version.disabled = !s;
  };
  fill();
  state.listeners.push(fill);
  version.addEventListener("change", () => { stored.checked = true; });
  const element = h("fieldset", {}, h("legend", {}, legend),
    h("div", {}, edited, h("label", { for: edited.id }, "the source in the editor (unsaved)")),
    h("div", { class: "inline center" }, stored, h("label", { for: stored.id }, "a stored version:"), version));
  version.setAttribute("aria-label", "Version");
  return { element, body: (editorValue) => (stored.checked ? { version: Number(version.value) } : { source: editorValue }) };
}

function dryRunView(state, editor) {
  const events = h("textarea", { class: "code", rows: 8, spellcheck: "false" });
  events.value = pretty(sampleEvents(state));
  const context = h("textarea", { class: "code", rows: 3, spellcheck: "false" });
  context.value = "{}";
  const pick = candidatePicker(state, "Run");
  const out = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Dry run");
  const form = h("form", { novalidate: true }, pick.element,
    field("Events (a JSON array, the shape of POST /v1/events)", events),
    field("Starting context of every user (a JSON object)", context), button, out);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, out, async () => {
      let evs = parseJson(events.value, "The events");
      if (!Array.isArray(evs)) evs = [evs];
      const body = { events: evs, context: parseJson(context.value || "{}", "The context"), ...pick.body(editor.value()) };
      const r = await api("POST", `/v1/scripts/${seg(state.name)}/dry-run`, body);
      out.replaceChildren(h("h3", {}, "Results"), resultsTable(r.results),
        r.made.length ? [h("h3", {}, "Events the rules made"), table(["Event", "Made by", "User", "Type", "Actions", "Errors"],
          r.made.map((m) => [m.id, `${m.made.via} from ${m.made.cause}`, m.made.user, m.made.type, actionList(m.actions), errorsCell(m.errors)]))] : null);
      announce("dry run done");
    });
  });
  return h("div", {}, h("p", { class: "muted" }, "Runs the events through the engine with no side effect anywhere: caps start from zero, budgets from their totals."), form);
}

function errorsCell(errors) {
  return errors && errors.length ? h("ul", { class: "plain bad" }, errors.map((x) => h("li", {}, x))) : h("span", { class: "muted" }, "none");
}

function resultsTable(results) {
  return table(["Event", "Status", "Actions", "Errors"], results.map((r) => [r.id ?? "(no id)",
    h("span", { class: `badge ${r.status === "rejected" ? "warn" : "ok"}` }, r.status), actionList(r.actions), errorsCell(r.errors)]),
  { empty: "No result." });
}

// -- backtest --------------------------------------------------------------------------------------------------

function backtestView(state, editor) {
  const pick = candidatePicker(state, "Candidate");
  const group = uid("traffic");
  const recorded = h("input", { type: "radio", name: group, value: "recorded", checked: true, id: uid("r") });
  const given = h("input", { type: "radio", name: group, value: "events", id: uid("r") });
  const last = h("input", { type: "number", min: 1, max: 100000, step: 1, value: "1000", inputmode: "numeric", "aria-label": "Last N events", class: "short" });
  const campaigns = [...new Set(state.uses.map((u) => u.campaign.id))];
  const campaign = select([["", "every campaign running it"], ...campaigns], undefined, { "aria-label": "Campaign" });
  const pasted = h("textarea", { class: "code", rows: 5, spellcheck: "false" });
  pasted.value = pretty(sampleEvents(state));
  for (const c of [last, campaign]) c.addEventListener("input", () => { recorded.checked = true; });
  pasted.addEventListener("input", () => { given.checked = true; });
  const out = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Backtest");
  const form = h("form", { novalidate: true }, pick.element,
    h("fieldset", {}, h("legend", {}, "Traffic"),
      h("div", { class: "inline center" }, recorded, h("label", { for: recorded.id }, "the last"), last, "recorded events of", campaign),
      h("div", { class: "inline center" }, given, h("label", { for: given.id }, "these events:")), field("Events (a JSON array)", pasted)),
    button, out);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, out, async () => {
      const body = { candidate: pick.body(editor.value()) };
      if (given.checked) {
        const evs = parseJson(pasted.value, "The events");
        body.events = Array.isArray(evs) ? evs : [evs];
      } else {
        const n = Number(last.value);
        if (!Number.isInteger(n) || n < 1) throw new Error("Last N events: give a whole number of at least 1.");
        body.recorded = campaign.value ? { last: n, campaign: campaign.value } : { last: n };
      }
      out.replaceChildren(h("p", { class: "muted" }, "Running both versions…"));
      const r = await api("POST", `/v1/scripts/${seg(state.name)}/backtest`, body);
      out.replaceChildren(backtestResult(r));
      announce(`backtest done: ${r.changed} of ${r.events} events changed`);
    });
  });
  return h("div", {}, h("p", { class: "muted" }, "Runs the same events through the active version and the candidate, from the same starting states, and shows what would change. Nothing is written anywhere."), form);
}

function signed(n) {
  return n > 0 ? `+${num(n)}` : num(n);
}

/** A count of grants added or removed: signed and coloured, or a plain 0. */
function delta(n, sign, cls) {
  return n ? h("span", { class: cls }, `${sign}${num(n)}`) : "0";
}

function backtestResult(r) {
  const cand = r.candidate.version ? `v${r.candidate.version}` : "the editor's source";
  const types = [...new Set([...Object.keys(r.grants.active), ...Object.keys(r.grants.candidate), ...Object.keys(r.grants.added), ...Object.keys(r.grants.removed)])].sort();
  const reasons = Object.keys(r.refusals).sort();
  const spend = [];
  for (const [campaign, budgets] of Object.entries(r.spend)) {
    for (const [name, both] of Object.entries(budgets)) spend.push([`${campaign} / ${name}`, num(both.active), num(both.candidate), signed(both.candidate - both.active)]);
  }
  return h("div", { class: "backtest" },
    h("h3", {}, `Active v${r.active.version} against ${cand}`),
    facts([
      ["Events", `${num(r.events)} (${num(r.users)} users${r.rejected ? `, ${num(r.rejected)} rejected` : ""})`],
      ["Changed (grants differ)", h("strong", {}, num(r.changed))],
      ["Rule errors", `active ${num(r.errors.active)}, candidate ${num(r.errors.candidate)}`],
      ["Sends or timers differ", num(r.effects_changed)],
      ["Users newly refused by a cap", `${num(r.caps.users)} (released: ${num(r.caps.released)})`],
      ["Took", `${r.seconds} s`],
      r.recorded ? ["Recorded traffic", `${num(r.recorded.found)} of the last ${num(r.recorded.last)} asked, from ${r.recorded.campaigns.join(", ") || "no campaign"}`] : null,
    ].filter(Boolean)),
    h("h4", {}, "Grants"),
    table(["Action type", "Active", "Candidate", "Added", "Removed"], types.map((t) => [h("code", {}, t),
      num(r.grants.active[t] || 0), num(r.grants.candidate[t] || 0), delta(r.grants.added[t], "+", "add"),
      delta(r.grants.removed[t], "−", "del")]), { empty: "Neither version grants anything on these events.", numeric: [1, 2, 3, 4] }),
    h("h4", {}, "Budget spend"),
    table(["Campaign / budget", "Active", "Candidate", "Difference"], spend, { empty: "No budget is spent.", numeric: [1, 2, 3] }),
    h("h4", {}, "Refusals"),
    table(["Refused by", "Active", "Candidate"], reasons.map((k) => [h("code", {}, k), num(r.refusals[k].active), num(r.refusals[k].candidate)]), { empty: "No refusal.", numeric: [1, 2] }),
    h("h4", {}, "Examples of changed events"),
    table(["Event", "User", "Active grants", "Candidate grants"], r.examples.map((x) => [
      h("span", {}, h("code", {}, x.event.id), ` ${x.event.type}`, h("br"), h("small", {}, when(x.event.ts))), x.event.user,
      actionList(x.active), actionList(x.candidate)]), { empty: "No event changed." }));
}

// -- activation and rollback -----------------------------------------------------------------------------------

/** The version to roll back to: the active one before the last activation (from the audit log), else the one
 * below the active version; while a canary runs, rolling back ends the canary. */
async function rollbackTarget(s) {
  if (s.canary) return { version: s.active, why: `end the canary of v${s.canary.version}: everyone runs v${s.active}` };
  try {
    const { entries } = await api("GET", "/v1/audit?limit=1000");
    const last = entries.find((e) => e.target === s.name && (e.action === "script.activate" || e.action === "script.canary"));
    const prev = last && last.detail && last.detail.previous ? last.detail.previous.active : null;
    if (prev && prev !== s.active && s.versions.includes(prev)) return { version: prev, why: `v${prev} was active before the last activation (${when(last.ts)}, by ${last.who})` };
  } catch (e) {
    if (e.status === 401) throw e;
  }
  const below = s.versions.filter((v) => v < s.active);
  if (below.length) return { version: below[below.length - 1], why: `the version before v${s.active}` };
  return null;
}

function activationView(state, refresh) {
  const s = state.script;
  if (!s) return h("p", { class: "empty" }, "Push a first version: it becomes active.");
  const version = select(s.versions.map((v) => [v, `v${v}`]), s.versions[s.versions.length - 1]);
  const percent = h("input", { type: "number", min: 0.01, max: 100, step: "any", value: "100", inputmode: "decimal" });
  const out = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Activate");
  const form = h("form", { class: "inline", novalidate: true }, field("Version", version),
    field("Share of the users (%)", percent, "100 rolls it out to everyone; less is a canary"), button);
  // The view is drawn again after a change: what it says is carried over in state.message.
  const activate = async (v, p, say) => {
    const r = await api("POST", `/v1/scripts/${seg(s.name)}/activate`, { version: v, percent: p });
    const text = say(r);
    state.message = h("p", { class: "ok", role: "status" }, text);
    announce(text);
    await refresh();
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(button, out, async () => {
      const p = Number(percent.value);
      if (!(p > 0 && p <= 100)) throw new Error("The share must be a number above 0 and at most 100.");
      await activate(Number(version.value), p, (r) => (r.canary
        ? `v${r.canary.version} runs for ${r.canary.percent}% of the users; the others keep v${r.active}.`
        : `v${r.active} is active on every shard.`));
    });
  });
  const back = h("button", { type: "button", class: "secondary" }, "Roll back");
  const backWhy = h("p", { class: "muted" });
  rollbackTarget(s).then((t) => {
    if (!t) {
      back.disabled = true;
      backWhy.textContent = "There is no earlier version to roll back to.";
      return;
    }
    back.textContent = s.canary ? `Roll back the canary (keep v${t.version})` : `Roll back to v${t.version}`;
    backWhy.textContent = t.why;
    back.addEventListener("click", () => busy(back, out, () => activate(t.version, 100,
      () => `Rolled back: v${t.version} is active on every shard.`)));
  }, (e) => backWhy.replaceChildren(errorBox(e, "The rollback target is unknown")));
  if (state.message) {
    out.replaceChildren(state.message);
    state.message = null;
  }
  return h("div", {}, facts([["Active", `v${s.active}`], ["Canary", s.canary ? `v${s.canary.version} for ${s.canary.percent}%` : "none"]]),
    form, h("div", { class: "actions" }, back), backWhy, out);
}

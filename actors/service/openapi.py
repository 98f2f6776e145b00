"""The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`): every endpoint IngressCore serves, with its
bodies, answers, errors and examples, built as plain data from the running configuration (a rescale's most
shards is its number of key groups). docs/http-api.md is the prose reference it follows.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from playbus.actors.service.openapi_schemas import NAME_PATTERN, arr, ref, schemas
from playbus.actors.service.replies import MAX_BODY, MAX_EVENTS

__all__ = ["document", "package_version"]

JSON = "application/json"
MSGPACK = ("application/msgpack", "application/x-msgpack")

INTRO = """\
playbus links the gameplays of marketing campaigns: gameplay services send **events**, Lua **rules** decide on
them with a per-user **context**, and the **actions** they emit are delivered to the target gameplays.

* Every answer is JSON, including the answers to msgpack requests. An error answer is
  `{"error": "a sentence saying what is wrong"}`, with `"field"` naming the bad field where one is.
* Bad input never causes a 500: it gets a 4xx, or a `rejected` result for one event. An unexpected fault on
  the server side (Redis unavailable, a shard restarting) is answered **503** with `Retry-After: 1`:
  retrying with the same event ids is always safe.
* **Admin** endpoints (marked with a lock) need `Authorization: Bearer <token>`, a token of
  `PLAYBUS_ADMIN_TOKEN` or `PLAYBUS_ADMIN_TOKENS` on the server; without one they answer 401, and when neither
  variable is set they refuse everything. Every change is written to the audit log with the token's label.
* Any other path, or a context/decisions path with a method other than GET, is answered
  `404 {"error": "no such endpoint: POST /x"}`; `/v1/events` and the admin paths answer **405** to a method
  they do not support.
* High-volume producers may instead write to the Redis streams of the Redis playbus uses (`playbus:in`, or the
  partitions `playbus:{kg<N>}:in`); see docs/http-api.md.
"""

TAGS = [
    {"name": "events", "description": "Events from gameplays, and what playbus decided for a user"},
    {"name": "health", "description": "Whether every shard and background component is healthy"},
    {"name": "scripts", "description": "Lua scripts: versions, activation and canaries, dry runs, backtests"},
    {"name": "campaigns", "description": "Operating running campaigns: create, replace, pause, top up, stats"},
    {"name": "operations", "description": "Failed rule runs and their replay, dead letters, the audit log"},
    {"name": "shards", "description": "The shard map, and rescaling a running cluster"},
    {"name": "docs", "description": "This document and its rendered reference"},
    {"name": "console", "description": "The operators' web page, which works through the admin endpoints"},
]


def package_version() -> str:
    try:
        return version("playbus")
    except PackageNotFoundError:  # a checkout that was never installed
        return "0.0.0+unknown"


# -- building blocks ----------------------------------------------------------------------------------------
def body(schema: dict[str, Any], example: Any = None, *types: str, required: bool = True,
         description: str = "") -> dict[str, Any]:
    content = {t: {"schema": schema, **({"example": example} if example is not None else {})}
               for t in (types or (JSON,))}
    return {"required": required, "content": content, **({"description": description} if description else {})}


def answer(description: str, schema: str | dict[str, Any] | None = None, example: Any = None,
           retry: bool = False) -> dict[str, Any]:
    """A JSON answer (an Error when no schema is given)."""
    s = ref(schema or "Error") if not isinstance(schema, dict) else schema
    out: dict[str, Any] = {"description": description,
                           "content": {JSON: {"schema": s, **({"example": example} if example is not None else {})}}}
    if retry:
        out["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return out


def fail(description: str, message: str | None = None, schema: str = "Error", **extra: Any) -> dict[str, Any]:
    return answer(description, schema, {"error": message, **extra} if message else None)


def param(name: str, where: str, description: str, schema: dict[str, Any], required: bool = False,
          example: Any = None) -> dict[str, Any]:
    p = {"name": name, "in": where, "description": description, "required": required or where == "path",
         "schema": schema}
    return {**p, "example": example} if example is not None else p


def op(op_id: str, tag: str, summary: str, description: str, responses: dict[str, Any], *, admin: bool = False,
       request: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None,
       server: bool = True) -> dict[str, Any]:
    """An operation; admin ones need the bearer token (401 otherwise); every one that reaches Redis or the shards
    may answer 503 (`server`)."""
    out: dict[str, Any] = {"operationId": op_id, "tags": [tag], "summary": summary, "description": description}
    if params:
        out["parameters"] = params
    responses = dict(responses)
    if request:
        out["requestBody"] = request
        responses.setdefault("413", fail(f"The body is larger than {MAX_BODY} bytes", "request body too large"))
    if admin:
        out["security"] = [{"adminToken": []}]
        responses["401"] = {"$ref": "#/components/responses/Unauthorized"}
    if server:
        responses.setdefault("503", {"$ref": "#/components/responses/Unavailable"})
    out["responses"] = dict(sorted(responses.items()))
    return out


NOT_ROUTED = fail("The path names no endpoint (a path parameter that is empty or not of its pattern)",
                  "no such endpoint: GET /v1/campaigns//users/u42/context")
LIMIT_400 = fail("`limit` is not an integer", "limit must be an integer")
BAD_JSON = fail("The body is not JSON, or not of this shape", "body is not valid JSON: Expecting value")
EXAMPLE_EVENT = {"id": "evt-7f3a", "campaign": "spring2026", "user": "u42", "type": "quiz.answered",
                 "ts": 1769000000000, "data": {"correct": True}}
EXAMPLE_ACTION = {"id": "a-f44a47a7e791d2de759381fb", "type": "lottery.grant_chance", "campaign": "spring2026",
                  "user": "u42", "params": {"chances": 1}, "cause": "evt-7f3a", "rule": "first_quiz_lottery",
                  "script_version": 1}


def limit(default: int, most: int) -> dict[str, Any]:
    return param("limit", "query", f"how many, default {default}, at most {most} (more counts as {most})",
                 {"type": "integer"}, example=default)


# -- the endpoints ------------------------------------------------------------------------------------------
def _events() -> dict[str, Any]:
    campaign = param("campaign", "path", "a campaign id (percent-encode `/` and `%`)", {"type": "string",
                                                                                        "minLength": 1},
                     example="spring2026")
    user = param("user", "path", "a user id (percent-encode `/` and `%`)", {"type": "string", "minLength": 1},
                 example="u42")
    events = {"oneOf": [ref("Event"), arr(ref("Event"), maxItems=MAX_EVENTS)]}
    results = {"results": [{"id": "evt-7f3a", "status": "applied", "actions": [EXAMPLE_ACTION], "errors": []},
                           {"id": "", "status": "rejected", "actions": [],
                            "errors": ["id: expected a string of 1..128 characters, got ''"]}]}
    post = op("postEvents", "events", "Send one event or up to 1000",
              "One event (an object) or several (an array of up to 1000), as JSON or msgpack. Each gets a result, "
              "in request order: `applied` (its effects are committed to Redis and its actions queued), "
              "`duplicate` (this id was applied before: nothing new happens, and `actions` repeats the first "
              "processing's) or `rejected` (invalid, `errors` says why; the others still run). Retrying with the "
              "same ids is always safe.",
              {"200": answer("Every event has a result, rejected ones included", "EventsAnswer", results),
               "400": fail("The body is not JSON (or not msgpack, with a msgpack content type)",
                           "body is not valid JSON: malformed"),
               "413": fail(f"More than {MAX_EVENTS} events, or a body over {MAX_BODY} bytes",
                           "1001 events in one request; at most 1000"),
               "503": answer("Overloaded (too many events in flight), or a transient failure: resend the same "
                             "events with the same ids after Retry-After", retry=True,
                             example={"error": "overloaded: too many events in flight"})},
              request=body(events, [EXAMPLE_EVENT], JSON, *MSGPACK,
                           description="`application/json` (the default when there is no Content-Type) or "
                                       "`application/msgpack` (also `application/x-msgpack`), the same structure"))
    context = op("getContext", "events", "A user's committed context and pending timers",
                 "The context as last committed, and the timers its rules set with `later` that are still pending, "
                 "soonest first. A user never seen gives an empty context.",
                 {"200": answer("The context", "Context", {"campaign": "spring2026", "user": "u42",
                                                           "context": {"quiz.answered": 1}, "timers": []}),
                  "404": NOT_ROUTED}, params=[campaign, user])
    decisions = op("getDecisions", "events", "A user's recent rule runs, newest first",
                   "The decision journal: one entry per rule run (the 100 most recent are kept).",
                   {"200": answer("The decisions", "Decisions", {"decisions": [
                       {"event": "evt-7f3a", "ts": 1769000000000, "rule": "first_quiz_lottery", "script_version": 1,
                        "actions": [EXAMPLE_ACTION], "changes": {"quiz.answered": 1}, "error": None, "refused": [],
                        "effects": []}]}),
                    "400": LIMIT_400, "404": NOT_ROUTED},
                   params=[campaign, user, param("limit", "query", "entries, default 20, clamped to 0..100",
                                                 {"type": "integer"}, example=20)])
    health = op("getHealth", "health", "Whether every shard and background component is healthy",
                "Asks every shard (5 s each) and the input router and delivery loop. 200 when all are healthy, "
                "else 503 with the same body, showing which part is not.",
                {"200": answer("Healthy", "Health", {"ok": True, "shards": [{"shard": 0, "ok": True, "problems": []}],
                                                     "components": {"delivery": {"ok": True, "problems": []}}}),
                 "503": answer("A shard or component is unhealthy (or did not answer): the same report; or, on an "
                               "unexpected fault, an error", {"anyOf": [ref("Health"), ref("Error")]}, retry=True)})
    base = "/v1/campaigns/{campaign}/users/{user}"
    return {"/v1/events": {"post": post}, f"{base}/context": {"get": context},
            f"{base}/decisions": {"get": decisions}, "/healthz": {"get": health}}


def _scripts() -> dict[str, Any]:
    name = param("name", "path", "the script's name (a rule's script file stem)", {"type": "string",
                                                                                  "pattern": NAME_PATTERN},
                 example="first_quiz_lottery")
    unknown = fail("No script of that name, or a name not of its pattern", "no script named 'x'")
    listing = op("listScripts", "scripts", "List the scripts", "Every script of the catalog, its versions and "
                 "the active one.", {"200": answer("The scripts", "ScriptList", {"scripts": [
                     {"name": "first_quiz_lottery", "active": 2, "versions": [1, 2]}]})}, admin=True)
    source = "function decide(event, ctx)\n  local n = ctx:incr(\"quiz.answered\", 1)\n" \
             "  if n == 1 then emit(\"lottery.grant_chance\", {chances = 1}) end\nend\n"
    push = op("pushScript", "scripts", "Store a new version of a script",
              "The body is the Lua source. It is compiled (and its test vectors run) first; once stored it is the "
              "next version, compiled on every shard, and not active yet (unless it is the first version of a new "
              "name).",
              {"201": answer("Stored", "ScriptPushed", {"name": "first_quiz_lottery", "version": 2}),
               "400": fail("The source is not UTF-8", "script source must be UTF-8 text"),
               "404": NOT_ROUTED,
               "413": fail("Source above 256 KiB", "script larger than 262144 bytes"),
               "422": answer("It does not compile, its top-level code fails, it defines no `decide` (line 0), or "
                             "its test vectors fail (`failures`): nothing is stored", "CompileError",
                             {"error": "first_quiz_lottery:2: unexpected symbol near 'then'", "line": 2})},
              admin=True, params=[name], request=body({"type": "string", "maxLength": 262144}, source, "text/plain",
                                                      description="the Lua source (UTF-8; the content type is not "
                                                                  "checked)"))
    show = op("getScript", "scripts", "A script: versions, active version, source, canary",
              "`source` is the active version's, or with `?version=N` that version's (and `version` is N); "
              "`canary` the version a share of the users runs, or null.",
              {"200": answer("The script", "Script", {"name": "first_quiz_lottery", "active": 2, "versions": [1, 2],
                                                      "source": source, "canary": None}),
               "400": fail("`version` is not a positive integer", "version must be a positive integer, got 'x'",
                           "FieldError", field="version"),
               "404": fail("No script of that name (or a name not of its pattern), or no such version",
                           "script 'first_quiz_lottery' has no version 9 (versions: [1, 2])")},
              admin=True, params=[name, param("version", "query", "show this version's source (default: the "
                                                                 "active one's)", {"type": "integer", "minimum": 1},
                                              example=1)])
    activate = op("activateScript", "scripts", "Activate a version, or run it for a share of the users (canary)",
                  "Every rule using the script runs that version from each shard's next batch; the answer comes "
                  "after every shard switched. With `percent` below 100 the version is a canary: users whose "
                  "bucket falls under that share run it; 100 completes the rollout, the old version rolls back.",
                  {"200": answer("Switched, or the canary set", "Activated", {"name": "first_quiz_lottery",
                                                                              "active": 2}),
                   "400": fail("The body is not a JSON object", 'body must be JSON like {"version": 2} or '
                                                                '{"version": 2, "percent": 10}'),
                   "404": unknown,
                   "422": fail("No such version, or `percent` not a number in (0, 100]",
                               "script 'first_quiz_lottery' has no version 9 (versions: [1, 2])")},
                  admin=True, params=[name], request=body(ref("Activate"), {"version": 2, "percent": 10}))
    dry_run = op("dryRunScript", "scripts", "Run events through a version, with no side effect",
                 "Runs the events through the engine inside the ingress with a version (or an unsaved source, "
                 "version 0) of this script, from the given context; writes nothing anywhere. Events the rules make "
                 "are decided too and listed under `made`.",
                 {"200": answer("Ran (rule errors are in the results)", "DryRunAnswer",
                                {"results": [{"id": "e1", "status": "applied", "actions": [], "errors": []}],
                                 "made": []}),
                  "400": fail("Body not JSON or not of this shape, `source` not a string, `context` not an "
                              "encodable object", 'body must be {"events": [...], "source" | "version": ..., '
                                                  '"context": {...}}'),
                  "404": fail("Unknown script and no `source`", "no script named 'x'"),
                  "413": fail("More than 1000 events", "at most 1000 events"),
                  "422": fail("Unknown `version`, a `source` that does not compile, or more than 10,000 events "
                              "decided (rules fanning out)", "script 'first_quiz_lottery' has no version 9")},
                 admin=True, params=[name], request=body(ref("DryRun"), {
                     "version": 1, "context": {"quiz.answered": 1},
                     "events": [{"id": "e1", "campaign": "spring2026", "user": "u42", "type": "quiz.answered",
                                 "ts": 1769000000000}]}))
    backtest = op("backtestScript", "scripts", "Compare the active version with a candidate, with no side effect",
                  "Runs the same events (given, or the last N recorded in the journals) through the active version "
                  "and a candidate from the same starting states, and says what would change: grants added and "
                  "removed, budget spend, caps hit, examples. Nothing is written, not even to the audit log.",
                  {"200": answer("Done", "BacktestAnswer"),
                   "400": fail("Body not JSON or not of this shape; `candidate` not exactly one of `source` and "
                               "`version`; neither or both of `events` and `recorded`",
                               'give either "events": [...] or "recorded": {"last": N}'),
                   "404": unknown,
                   "413": fail("More than 1000 `events`, `recorded.last` above 100,000, `source` above 256 KiB",
                               "recorded.last: at most 100000 events, got 200000"),
                   "422": answer("No such version, a source that does not compile (with `line`), a bad "
                                 "`recorded`, no running campaign runs the script, or nothing recorded",
                                 "CompileError", {"error": "no running campaign has a rule running script 'x': "
                                                           "nothing to compare"}),
                   "429": answer("A backtest is already running on this ingress replica", retry=True,
                                 example={"error": "a backtest is already running on this replica; retry once it "
                                                   "is done"})},
                  admin=True, params=[name], request=body(ref("Backtest"), {"candidate": {"version": 2},
                                                                            "recorded": {"last": 1000}}))
    base = "/v1/scripts/{name}"
    return {"/v1/scripts": {"get": listing}, base: {"get": show, "put": push},
            f"{base}/activate": {"post": activate}, f"{base}/dry-run": {"post": dry_run},
            f"{base}/backtest": {"post": backtest}}


def _campaigns() -> dict[str, Any]:
    cid = param("campaign", "path", "the campaign id", {"type": "string", "pattern": NAME_PATTERN},
                example="spring2026")
    unknown = fail("No such campaign, or an id not of its pattern", "no campaign 'x' (campaigns: spring2026)")
    doc = {"id": "summer2026", "timezone": "Asia/Shanghai", "starts": "2026-06-01T00:00:00+08:00",
           "ends": "2026-07-01T00:00:00+08:00",
           "rules": [{"id": "first_quiz_lottery", "on": "quiz.answered", "script": "first_quiz_lottery",
                      "emits": ["lottery.grant_chance"], "sends": []}],
           "caps": [{"id": "lottery.grant_chance/day/3", "action": "lottery.grant_chance", "per_user": 3,
                     "period": "day"}], "budgets": []}
    put = op("putCampaign", "campaigns", "Create or replace a running campaign",
             "The shape of one `campaigns` item of the configuration, a rule's `script` being the name of a script "
             "of the catalog. Checked like the file's; every shard runs it from its next batch. Replacing keeps "
             "its users' contexts, dedup ids, timers and cap counts (by cap id); a paused campaign stays paused.",
             {"200": answer("Replaced: the campaign as it runs", "Campaign", {**doc, "paused": False}),
              "201": answer("Created: the campaign as it runs", "Campaign", {**doc, "paused": False}),
              "400": fail("The body is not JSON", "body is not valid JSON: Expecting value"),
              "404": NOT_ROUTED,
              "422": fail("A bad field, named from the campaign's top (also an `id` other than the path's)",
                          "rules[0].script: no script of that name in the catalog (push it first: PUT "
                          "/v1/scripts/{name}) (got 'nope')", "FieldError", field="rules[0].script")},
             admin=True, params=[cid], request=body(ref("CampaignInput"), {k: v for k, v in doc.items()
                                                                            if k != "id"}))
    listing = op("listCampaigns", "campaigns", "The running campaigns",
                 "Every campaign as it runs (the file's and those created through the API), by id, each as "
                 "`GET /v1/campaigns/{campaign}` shows it.",
                 {"200": answer("The campaigns", "CampaignList", {"campaigns": [{**doc, "paused": False}]})},
                 admin=True)
    get = op("getCampaign", "campaigns", "A campaign as it runs, and whether it is paused",
             "The file's campaigns and those created through the API.",
             {"200": answer("The campaign", "Campaign", {**doc, "paused": False}), "404": unknown},
             admin=True, params=[cid])

    def switch(what: str, paused: bool) -> dict[str, Any]:
        return op(f"{what}Campaign", "campaigns", f"{what.capitalize()} the campaign's rules",
                  "A kill switch: while paused, its events are applied with no rule run, its due timers are "
                  "consumed without one, and replays are refused. `changed` is false when it already was so.",
                  {"200": answer("Applied by every shard", "Paused", {"id": "spring2026", "paused": paused,
                                                                       "changed": True}),
                   "404": unknown}, admin=True, params=[cid])

    topup = op("topUpBudget", "campaigns", "Raise a budget's total",
               "The total and the part not yet leased to shards are raised together.",
               {"200": answer("Raised", "ToppedUp", {"campaign": "spring2026", "budget": "cash", "total": 53000}),
                "400": fail("The body is not JSON", "body is not valid JSON: Expecting value"),
                "404": fail("Unknown campaign, or no such budget",
                            "campaign 'spring2026' has no budget 'gold' (budgets: cash, points)"),
                "422": fail("`amount` not a whole number from 1 to 10^15",
                            "amount: expected a positive integer of at most 1000000000000000, got -5")},
               admin=True, params=[cid, param("budget", "path", "the budget's name", {"type": "string",
                                                                                     "minLength": 1},
                                              example="cash")],
               request=body(ref("TopUp"), {"amount": 50000}))
    stats = op("getCampaignStats", "campaigns", "Budgets, grants, refusals, rule runs and errors, delivery",
               "Counted by the commits, exactly once per rule run, summed over the key groups.",
               {"200": answer("The stats", "Stats", {
                   "campaign": "spring2026", "paused": False, "budgets": {"cash": {"total": 53000, "spent": 2100,
                                                                                   "left": 50900}},
                   "grants": {"lottery.grant_chance": 412}, "refusals": {"cap:lottery.grant_chance/day/3": 17},
                   "rules": {"first_quiz_lottery": {"2": {"runs": 980, "errors": 0}}},
                   "delivery": {"backlog": 0, "dead": 1, "exact": True}}),
                "404": unknown}, admin=True, params=[cid])
    base = "/v1/campaigns/{campaign}"
    return {"/v1/campaigns": {"get": listing},
            base: {"get": get, "put": put}, f"{base}/pause": {"post": switch("pause", True)},
            f"{base}/resume": {"post": switch("resume", False)},
            f"{base}/budgets/{{budget}}/topup": {"post": topup}, f"{base}/stats": {"get": stats}}


def _operations() -> dict[str, Any]:
    failed = op("listFailedRuns", "operations", "Failed rule runs, newest first",
                "The rule runs that failed, kept for a replay.",
                {"200": answer("The failed runs", "FailedRuns", {"failed": [{
                    "id": "17/1769000123456-0", "event": EXAMPLE_EVENT, "rule": "first_quiz_lottery",
                    "script_version": 2, "error": "first_quiz_lottery:7: attempt to index a nil value",
                    "at": 1769000123456}]}), "400": LIMIT_400}, admin=True,
                params=[param("campaign", "query", "only this campaign's", {"type": "string"}),
                        param("rule", "query", "only this rule's", {"type": "string"}), limit(50, 1000)])
    replay = op("replayFailedRuns", "operations", "Run failed rule runs again, once (补单)",
                "Each failed run of the campaign (or of one rule) runs once more on the active version, through "
                "its user's shard; effects exactly once, even if replay runs twice or crashes half-way.",
                {"200": answer("Done (also when nothing was found)", "Replayed", {
                    "found": 1, "replayed": 1, "failed_again": 0, "already_replayed": 0, "refused": [], "errors": [],
                    "actions": [], "more": False}),
                 "400": fail("Body not JSON, not an object with a string `campaign`, or `rule` not a string",
                             'body must be {"campaign": ..., "rule": ... (optional)}')},
                admin=True, request=body(ref("Replay"), {"campaign": "spring2026", "rule": "first_quiz_lottery"}))
    dead = op("listDeadLetters", "operations", "Dead-lettered deliveries, newest first",
              "The actions that delivery gave up on.",
              {"200": answer("The dead letters", "DeadLetters", {"dead": [{
                  "id": "1769000123456-0", "target": "wallet", "error": "HTTP 400: unknown user", "attempts": 1,
                  "kg": 17, "at": 1769000123456, "action": EXAMPLE_ACTION}]}),
               "400": fail("`limit` is not a whole number >= 0", "limit must be an integer from 0 to 1000, got 'x'")},
              admin=True, params=[param("target", "query", "only this gameplay's", {"type": "string"},
                                        example="wallet"), limit(50, 1000)])
    redrive = op("redriveDeadLetters", "operations", "Send dead-lettered actions again, with their original ids",
                 "Queues them for delivery again (each with its original bytes and id) and removes them from the "
                 "dead-letter stream, atomically per action: a second redrive of the same ids finds them "
                 "`not_found`.",
                 {"200": answer("Done (also when nothing was left)", "Redriven", {
                     "redriven": 1, "ids": ["a-4dd2d96ed980b98bc823d4d2"], "not_found": []}),
                  "400": fail("Body not JSON or not an object, an unknown field, bad `ids`, `all` not a boolean, "
                              "both or neither of `ids` and `all: true`, `target` not a non-empty string",
                              "give either ids or all, not both")},
                 admin=True, request=body(ref("Redrive"), {"target": "wallet", "ids": ["a-4dd2d96ed980b98bc823d4d2"]}))
    audit = op("getAudit", "operations", "Who changed what, when", "Every change made through the admin "
               "endpoints, newest first, with the label of the token that made it.",
               {"200": answer("The entries", "Audit", {"entries": [{
                   "ts": 1769000200000, "who": "alice", "action": "campaign.pause", "target": "spring2026",
                   "detail": {}}]}), "400": LIMIT_400}, admin=True, params=[limit(50, 1000)])
    shard_map = {"count": 2, "target": 2, "generation": 3, "rescaling": False,
                 "shards": [{"shard": 0, "groups": 64}, {"shard": 1, "groups": 64}], "last": None}
    shards_get = op("getShards", "shards", "The shard map", "How many shards own the key groups, how many groups "
                    "each owns, and the figures of the last rescale.",
                    {"200": answer("The map", "Shards", shard_map),
                     "404": fail("No shard map (the cluster has not started on this Redis)",
                                 "no shard map: the cluster has not started on this Redis")}, admin=True)
    shards_post = op("rescaleShards", "shards", "Rescale a running cluster",
                     "Whole key groups move between shards while traffic flows, nothing lost or doubled. Done when "
                     "`count` is N and `rescaling` false (GET /v1/shards), and /healthz lists N shards.",
                     {"202": answer("Asked for: the map as it stands, with the target and a message", "Shards",
                                    {**shard_map, "target": 4, "rescaling": True,
                                     "message": "rescaling from 2 to 4 shards: done when /healthz lists 4"}),
                      "400": fail('The body is not {"count": N}', 'expected {"count": N}', field="count"),
                      "422": fail("`count` not an integer in 1..key_groups, or no shard map",
                                  "count: must be 1..128 (the number of key groups), got 0", "FieldError",
                                  field="count")},
                     admin=True, request=body(ref("ShardCount"), {"count": 4}))
    return {"/v1/failed": {"get": failed}, "/v1/failed/replay": {"post": replay}, "/v1/dead": {"get": dead},
            "/v1/dead/redrive": {"post": redrive}, "/v1/audit": {"get": audit},
            "/v1/shards": {"get": shards_get, "post": shards_post}}


def _docs() -> dict[str, Any]:
    spec = op("getOpenApi", "docs", "This document", "The OpenAPI 3.1 description of every endpoint.",
              {"200": answer("The document", {"type": "object", "required": ["openapi", "info", "paths"]})},
              server=False)
    page = op("getDocs", "docs", "The rendered reference", "An HTML page that renders this document (Swagger UI, "
              "served by playbus itself).",
              {"200": {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}},
              server=False)
    asset = op("getDocsAsset", "docs", "A file of the rendered reference",
               "The Swagger UI files the page loads (scripts, styles, icons).",
               {"200": {"description": "The file", "content": {t: {"schema": {"type": "string"}} for t in
                                                               ("text/javascript", "text/css", "image/png")}},
                "404": fail("No such file", "no such file: x.js")}, server=False,
               params=[param("file", "path", "a file name", {"type": "string"}, example="swagger-ui.css")])
    return {"/openapi.json": {"get": spec}, "/docs": {"get": page}, "/docs/assets/{file}": {"get": asset}}


def _console() -> dict[str, Any]:
    files = {"description": "The file", "content": {t: {"schema": {"type": "string"}} for t in
                                                    ("text/html", "text/javascript", "text/css", "image/svg+xml")}}
    page = op("getConsole", "console", "The operators' console",
              "An HTML page over the admin API (it asks for an admin token and keeps it for the browser tab): "
              "campaigns with live stats and plots, scripts (versions, diff, editor, dry-run, backtest, activation "
              "and rollback), a user's decisions explained, failed runs, dead letters, the audit log, the shards. "
              "Served by playbus itself: nothing is loaded from elsewhere.",
              {"200": {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}})
    short = {**page, "operationId": "getConsoleShort", "summary": "The operators' console (the same page)"}
    asset = op("getConsoleFile", "console", "A file of the console",
               "The scripts (JavaScript modules) and styles the page loads.",
               {"200": files, "404": fail("No such file", "no such file: /ui/x.js")},
               params=[param("file", "path", "a file name", {"type": "string"}, example="app.js")])
    return {"/ui": {"get": short}, "/ui/": {"get": page}, "/ui/{file}": {"get": asset}}


def document(key_groups: int) -> dict[str, Any]:
    """The OpenAPI document; `key_groups`: the cluster's, the most shards a rescale may ask for."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "playbus HTTP API", "version": package_version(), "description": INTRO},
        "tags": TAGS,
        "paths": {**_events(), **_scripts(), **_campaigns(), **_operations(), **_docs(), **_console()},
        "components": {
            "schemas": schemas(key_groups),
            "securitySchemes": {"adminToken": {
                "type": "http", "scheme": "bearer",
                "description": "a token of PLAYBUS_ADMIN_TOKEN (label `admin`) or PLAYBUS_ADMIN_TOKENS "
                               "(`label:token,...`) on the server"}},
            "headers": {"RetryAfter": {"description": "seconds to wait before retrying (the same ids are safe)",
                                       "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
            "responses": {
                "Unauthorized": {
                    "description": "Missing or wrong admin token; or admin endpoints are disabled (no token set "
                                   "on the server, or PLAYBUS_ADMIN_TOKENS malformed)",
                    "headers": {"WWW-Authenticate": {"description": "`Bearer` (for a missing or wrong token)",
                                                     "schema": {"type": "string"}}},
                    "content": {JSON: {"schema": ref("Error"), "example": {"error": "missing or wrong admin token"}}}},
                "Unavailable": answer("Temporarily unavailable (Redis unavailable, a shard restarting or that could "
                                      "not be told of a change, which it then takes on its own within 0.5 s): retry "
                                      "after Retry-After", retry=True,
                                      example={"error": "temporarily unavailable: ConnectionError: ..."}),
            },
        },
    }

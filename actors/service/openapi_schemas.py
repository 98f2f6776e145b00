"""The JSON Schemas (2020-12, as OpenAPI 3.1 takes them) of the HTTP API's bodies: `components.schemas` of the
document that openapi.py builds. What each field is, as docs/http-api.md says it; answers allow fields added later.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NAME_PATTERN", "schemas"]

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$"  # a script name, a campaign id (admin paths)
MAX_TS = 2**53 - 1

STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
NUM: dict[str, Any] = {"type": "number"}
BOOL: dict[str, Any] = {"type": "boolean"}
OBJ: dict[str, Any] = {"type": "object"}
MS: dict[str, Any] = {"type": "integer", "description": "milliseconds since the Unix epoch"}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(props: dict[str, Any], required: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    """An object of these properties; all of them required unless `required` says which."""
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **kw}


def arr(items: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **kw}


def counts(what: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": INT, "description": what}


def _events() -> dict[str, Any]:
    event = obj({
        "id": {**STR, "minLength": 1, "maxLength": 128, "description": "your unique id: the idempotency key"},
        "campaign": {**STR, "minLength": 1, "maxLength": 256, "description": "a campaign of the configuration"},
        "user": {**STR, "minLength": 1, "maxLength": 256},
        "type": {**STR, "minLength": 1, "maxLength": 256, "description": "rules with this `on` run"},
        "ts": {**MS, "minimum": 0, "maximum": MAX_TS, "description": "event time, ms since the epoch (default: "
                                                                     "when playbus decides it)"},
        "data": {**OBJ, "description": "any object, at most 16 KiB once encoded as msgpack; integers of 64 bits"},
    }, ["id", "campaign", "user", "type"], description="An event from a gameplay. An invalid one is not a 400: it "
                                                       "gets a `rejected` result naming the field.",
        examples=[{"id": "evt-7f3a", "campaign": "spring2026", "user": "u42", "type": "quiz.answered",
                   "ts": 1769000000000, "data": {"correct": True}}])
    action = obj({
        "id": {**STR, "description": "`a-` and 24 hex digits, deterministic: receivers deduplicate on it"},
        "type": {**STR, "description": "the target gameplay is the part before the first dot"},
        "campaign": STR, "user": STR,
        "params": {**OBJ, "description": "the table the script passed to `emit`"},
        "cause": {**STR, "description": "the id of the event that caused it"},
        "rule": STR, "script_version": INT,
    }, examples=[{"id": "a-f44a47a7e791d2de759381fb", "type": "lottery.grant_chance", "campaign": "spring2026",
                  "user": "u42", "params": {"chances": 1}, "cause": "evt-7f3a", "rule": "first_quiz_lottery",
                  "script_version": 1}])
    result = obj({
        "id": {**nullable(STR), "description": "the event's id; null for a rejected event without a string id"},
        "status": {"enum": ["applied", "duplicate", "rejected"]},
        "actions": {**arr(ref("Action")), "description": "granted (applied), or granted the first time (duplicate)"},
        "errors": {**arr(STR), "description": "rejected: why; applied: one per rule that failed on this event"},
    })
    made = obj({"via": {"enum": ["send", "timer"]}, "user": STR, "type": STR, "ts": INT, "cause": STR,
                "depth": INT}, ["via"])
    made_line = {"allOf": [ref("Result"), obj({"context": OBJ, "made": ref("MadeBy")}, ["context", "made"])],
                 "description": "an event the rules made, decided in the dry run: its result, its user's context "
                                "after it, and how it was made"}
    timer = obj({"key": nullable(STR), "id": STR, "type": STR, "due": MS})
    refused = obj({"type": STR, "params": OBJ, "reason": STR})
    decision = obj({
        "event": STR, "ts": MS, "rule": STR, "script_version": INT, "actions": arr(ref("Action")),
        "changes": {**OBJ, "description": "context keys this run wrote, with their new values (null: deleted)"},
        "error": {**nullable(STR), "description": "null, or the error of a failed run"},
        "refused": {**nullable(arr(ref("Refused"))), "description": "emits refused by a cap or a budget"},
        "effects": {**nullable(arr(OBJ)), "description": "sends, timers set, cancels, fired, replay: in call order"},
    })
    return {
        "Event": event, "Action": action, "Result": result, "MadeBy": made, "MadeLine": made_line,
        "EventsAnswer": obj({"results": arr(ref("Result"))}),
        "Timer": timer, "Refused": refused, "Decision": decision,
        "Context": obj({"campaign": STR, "user": STR, "context": OBJ, "timers": arr(ref("Timer"))}),
        "Decisions": obj({"decisions": arr(ref("Decision"))}),
    }


def _health() -> dict[str, Any]:
    problems = {**arr(STR), "description": "why it is unhealthy; empty when ok"}
    loop = obj({"running": BOOL, "restarts": INT, "last_error": STR}, ["running"])
    shard = obj({
        "shard": INT, "ok": BOOL, "problems": problems, "groups": INT, "users": INT, "batches": INT, "events": INT,
        "sent": INT, "timers_set": INT, "timers_cancelled": INT, "fired": INT, "last_commit_ms": NUM,
        "disabled_rules": arr(obj({"rule": STR, "why": STR})), "reader": loop,
        "timers": {"allOf": [loop], "properties": {"lateness_ms": nullable(obj({"p50": NUM, "p99": NUM,
                                                                               "max": NUM}))}},
        "queued": INT, "oldest_wait_s": NUM,
    }, ["shard", "ok", "problems"], description="one shard; one that did not answer has only shard, ok and problems")
    component = obj({"ok": BOOL, "problems": problems, "restarts": INT, "last_error": STR}, ["ok", "problems"])
    return {"ShardHealth": shard, "ComponentHealth": component,
            "Health": obj({"ok": BOOL, "shards": arr(ref("ShardHealth")),
                           "components": {**OBJ, "additionalProperties": ref("ComponentHealth"),
                                          "description": "input_router, delivery"}}, ["ok", "shards"])}


def _scripts() -> dict[str, Any]:
    canary = obj({"version": INT, "percent": NUM})
    versions = arr(INT)
    dry_run = obj({
        "events": arr(ref("Event"), maxItems=1000, description="the events to run (up to 1000)"),
        "source": {**STR, "description": "a Lua source to try, reported as version 0"},
        "version": {**INT, "description": "a stored version to try (default: the active one)"},
        "context": {**nullable(OBJ), "description": "the starting context of every user the events touch"},
    }, ["events"])
    backtest = obj({
        "candidate": {"oneOf": [obj({"source": STR}, additionalProperties=False),
                                obj({"version": INT}, additionalProperties=False)]},
        "events": arr(ref("Event"), minItems=1, maxItems=1000),
        "recorded": obj({"last": {**INT, "minimum": 1, "maximum": 100_000},
                         "campaign": {**nullable(STR), "description": "only this campaign's events"}}, ["last"]),
    }, ["candidate"], description="`candidate`, and exactly one of `events` and `recorded`",
        oneOf=[{"required": ["events"]}, {"required": ["recorded"]}])
    grants = obj({"added": counts("per action type"), "removed": counts("per action type"),
                  "active": counts("all grants of the active version"),
                  "candidate": counts("all grants of the candidate")})
    both = obj({"active": INT, "candidate": INT})
    example_action = obj({"rule": STR, "type": STR, "params": OBJ, "script_version": INT})
    answer = obj({
        "script": STR, "active": obj({"version": INT}), "candidate": obj({"version": INT}),
        "events": INT, "users": INT, "changed": INT, "rejected": INT, "grants": grants,
        "budgets": counts("per budget: the candidate's spend minus the active version's"),
        "spend": {**OBJ, "additionalProperties": {**OBJ, "additionalProperties": both}},
        "caps": obj({"users": INT, "released": INT,
                     "examples": arr(obj({"campaign": STR, "user": STR, "caps": arr(STR)}))}),
        "refusals": {**OBJ, "additionalProperties": both}, "errors": both, "effects_changed": INT,
        "examples": arr(obj({"event": OBJ, "active": arr(example_action), "candidate": arr(example_action)})),
        "recorded": obj({"last": INT, "found": INT, "campaigns": arr(STR), "journal_entries": INT}),
        "starting_states": obj({"users": INT, "committed": INT, "unreadable": INT, "rewound": INT,
                                "assumed_absent": INT, "complete": BOOL}, ["users", "committed", "unreadable"]),
        "seconds": NUM, "decide_seconds": NUM,
    }, ["script", "active", "candidate", "events", "users", "changed", "rejected", "grants", "budgets", "spend",
        "caps", "refusals", "errors", "effects_changed", "examples", "starting_states", "seconds"])
    return {
        "ScriptList": obj({"scripts": arr(obj({"name": STR, "active": INT, "versions": versions}))}),
        "Script": obj({"name": STR, "active": {**INT, "description": "the active version"}, "versions": versions,
                       "source": {**STR, "description": "the source of the active version"},
                       "canary": {**nullable(ref("Canary")), "description": "a canary under way, or null"},
                       "version": {**INT, "description": "with `?version=N`: N, the version whose source this is"}},
                      ["name", "active", "versions", "source", "canary"]),
        "Canary": canary,
        "ScriptPushed": obj({"name": STR, "version": INT}),
        "CompileError": obj({"error": STR, "line": {**INT, "description": "0 when no `decide` is defined"},
                             "failures": {**arr(STR), "description": "the test vectors' cases that failed"}},
                            ["error"]),
        "Activate": obj({"version": INT, "percent": {**NUM, "exclusiveMinimum": 0, "maximum": 100,
                                                     "description": "below 100: a canary for that share of users"}},
                        ["version"]),
        "Activated": obj({"name": STR, "active": INT, "canary": canary}, ["name", "active"]),
        "DryRun": dry_run,
        "DryRunAnswer": obj({"results": arr(ref("Result")), "made": arr(ref("MadeLine"))}),
        "Backtest": backtest, "BacktestAnswer": answer,
    }


def _campaigns() -> dict[str, Any]:
    name = {**STR, "pattern": NAME_PATTERN}
    rule = obj({"id": {**name, "maxLength": 128}, "on": {**STR, "description": "the event type it runs on"},
                "script": {**STR, "description": "the name of a script in the catalog"},
                "emits": arr(STR), "sends": arr(STR)}, ["id", "on", "script"], additionalProperties=False)
    cap = obj({"id": STR, "action": STR, "per_user": {**INT, "minimum": 0},
               "period": {"enum": ["day", "week", "campaign"]}}, ["action", "per_user", "period"],
              additionalProperties=False)
    budget = obj({"name": {**name, "maxLength": 64}, "action": STR, "param": STR, "total": {**INT, "minimum": 0}},
                 additionalProperties=False)
    campaign = obj({
        "id": {**name, "maxLength": 128, "description": "optional; when given, the path's"},
        "timezone": {**STR, "description": "an IANA time zone (default UTC)"},
        "starts": {**STR, "description": "ISO 8601 with an offset"}, "ends": STR,
        "rules": arr(ref("Rule")), "caps": arr(ref("Cap")), "budgets": arr(ref("Budget")),
    }, ["starts", "ends"], additionalProperties=False)
    running = {"allOf": [obj({"id": STR, "timezone": STR, "starts": STR, "ends": STR, "rules": arr(OBJ),
                              "caps": arr(OBJ), "budgets": arr(OBJ), "paused": BOOL})],
               "description": "the campaign as it runs, every field filled in (defaults, derived cap ids), and "
                              "whether it is paused"}
    stats = obj({
        "campaign": STR, "paused": BOOL,
        "budgets": {**OBJ, "additionalProperties": obj({"total": INT, "spent": INT, "left": INT})},
        "grants": counts("actions granted, by action type"),
        "refusals": counts("actions refused, by `cap:<id>`, `budget:<name>` or `timers`"),
        "rules": {**OBJ, "description": "rule -> script version -> runs and errors",
                  "additionalProperties": {**OBJ, "additionalProperties": obj({"runs": INT, "errors": INT})}},
        "delivery": obj({"backlog": INT, "dead": INT, "exact": BOOL}),
    })
    return {
        "Rule": rule, "Cap": cap, "Budget": budget, "CampaignInput": campaign, "Campaign": running,
        "CampaignList": obj({"campaigns": arr(ref("Campaign"))}),
        "Paused": obj({"id": STR, "paused": BOOL, "changed": BOOL}),
        "TopUp": obj({"amount": {**INT, "minimum": 1, "maximum": 10**15}}),
        "ToppedUp": obj({"campaign": STR, "budget": STR, "total": INT}),
        "Stats": stats,
    }


def _operations(key_groups: int) -> dict[str, Any]:
    failed = obj({"id": {**STR, "description": "<key group>/<stream entry id>"},
                  "event": {**OBJ, "description": "the event as the rule saw it"},
                  "rule": STR, "script_version": INT, "error": STR, "at": MS})
    id_errors = arr(obj({"id": STR, "errors": arr(STR)}))
    replayed = obj({"found": INT, "replayed": INT, "failed_again": INT, "already_replayed": INT,
                    "refused": id_errors, "errors": id_errors, "actions": arr(ref("Action")), "more": BOOL})
    dead = obj({"id": {**STR, "description": "the entry id in the playbus:dead stream"},
                "action": {**nullable(ref("Action")), "description": "null when the stored action is unreadable "
                                                                     "(its text under `raw`)"},
                "target": STR, "error": STR, "attempts": INT, "kg": nullable(INT), "at": MS, "raw": STR},
               ["id", "action", "target", "error", "attempts", "kg", "at"])
    redrive = obj({"ids": arr({**STR, "minLength": 1}, minItems=1, maxItems=10_000, description="action ids"),
                   "all": {**BOOL, "description": "every dead letter (of `target`), instead of `ids`"},
                   "target": {**nullable({**STR, "minLength": 1}), "description": "only this gameplay's"}}, [],
                  additionalProperties=False)
    entry = obj({"ts": MS, "who": {**STR, "description": "the label of the token"}, "action": STR, "target": STR,
                 "detail": OBJ})
    shards = obj({
        "count": {**INT, "description": "shards of the last finished rescale (what /healthz lists)"},
        "target": {**INT, "description": "shards asked for; differs from count while rescaling"},
        "generation": INT, "rescaling": BOOL, "shards": arr(obj({"shard": INT, "groups": INT})),
        "last": {**nullable(OBJ), "description": "the figures of the last rescale"},
        "message": STR,
    }, ["count", "target", "generation", "rescaling", "shards", "last"])
    return {
        "FailedRun": failed, "FailedRuns": obj({"failed": arr(ref("FailedRun"))}),
        "Replay": obj({"campaign": STR, "rule": {**nullable(STR), "description": "only this rule's runs"}},
                      ["campaign"]), "Replayed": replayed,
        "DeadLetter": dead, "DeadLetters": obj({"dead": arr(ref("DeadLetter"))}),
        "Redrive": redrive,
        "Redriven": obj({"redriven": INT, "ids": arr(STR), "not_found": arr(STR), "ids_truncated": BOOL},
                        ["redriven", "ids", "not_found"]),
        "AuditEntry": entry, "Audit": obj({"entries": arr(ref("AuditEntry"))}),
        "ShardCount": obj({"count": {**INT, "minimum": 1, "maximum": key_groups,
                                     "description": "1 to the number of key groups"}}, additionalProperties=False),
        "Shards": shards,
    }


def schemas(key_groups: int) -> dict[str, Any]:
    """Every schema of `components.schemas`, by name (`key_groups`: the most shards a rescale may ask for)."""
    error = obj({"error": {**STR, "description": "a sentence saying what is wrong"},
                 "field": {**STR, "description": "the field at fault, when one is"}}, ["error"])
    field_error = obj({"error": STR, "field": {**STR, "description": "the bad field, e.g. rules[0].emits[1] (from "
                                                                      "the campaign's top) or count"}})
    return {"Error": error, "FieldError": field_error, **_events(), **_health(), **_scripts(), **_campaigns(),
            **_operations(key_groups)}

"""The described API (`GET /openapi.json`, `GET /docs`): a valid OpenAPI 3.1 document whose paths are exactly the
ones the ingress routes, read from the routing code itself (its path literals and path patterns), so that an
endpoint added without its description fails here; examples that match their schemas; the rendered reference
served from the installed Swagger UI files, with their content types.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from playbus.actors.service import http_api
from playbus.actors.service.api_docs import ASSETS, ApiDocs
from playbus.actors.service.openapi import document

try:  # the regex parser: re._parser from Python 3.11, sre_parse before
    from re import _parser as sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse as sre  # type: ignore[no-redef]

SERVICE = Path(http_api.__file__).resolve().parent
DOC = document(key_groups=16)
METHODS = ("get", "put", "post", "delete", "patch")


# -- what the routing code routes ---------------------------------------------------------------------------
def _modules() -> Iterator[tuple[str, ast.Module]]:
    """The service modules that route (not the description itself: openapi*.py)."""
    for path in sorted(SERVICE.glob("*.py")):
        if not path.name.startswith("openapi"):
            yield path.name, ast.parse(path.read_text(encoding="utf-8"))


def _is_path(s: object) -> bool:
    return isinstance(s, str) and len(s) > 1 and re.fullmatch(r"/[A-Za-z0-9_.\-/]*", s) is not None


def routed_literals() -> set[str]:
    """Every path literal of the service modules: the exact paths they compare with and the prefixes they test."""
    found = set()
    for _, tree in _modules():
        parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and _is_path(node.value) and id(node) not in parts:  # no f-string parts
                found.add(node.value)
    return found


def routed_patterns() -> list[re.Pattern[str]]:
    """Every compiled path pattern of the service modules (re.compile(r"^/...")) ."""
    found = []
    for _, tree in _modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "compile"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).startswith("^/")):
                found.append(re.compile(node.args[0].value))
    return found


def _samples(items: Any) -> list[str]:
    """One path of each shape a parsed pattern matches: every alternative, with and without optional parts."""
    out = [""]
    for op, av in items:
        out = [a + b for a in out for b in _node(op, av)]
    return out


def _node(op: Any, av: Any) -> list[str]:
    if op == sre.LITERAL:
        return [chr(av)]
    if op == sre.AT:
        return [""]
    if op == sre.NOT_LITERAL:
        return ["x" if chr(av) != "x" else "y"]
    if op == sre.IN:
        if av and av[0][0] == sre.NEGATE:
            return ["x"]
        kind, value = av[0]
        return [chr(value[0] if kind == sre.RANGE else value)]
    if op == sre.SUBPATTERN:
        return _samples(av[-1])
    if op == sre.BRANCH:
        return [s for branch in av[1] for s in _samples(branch)]
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
        low, high, sub = av
        return ([""] if low == 0 else []) + (_samples(sub) if high >= 1 and low <= 1 else [])
    raise AssertionError(f"a path pattern with {op}: extend _node")


def routed_samples() -> set[str]:
    return {s for p in routed_patterns() for s in _samples(sre.parse(p.pattern))}


def _template(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")


def _instance(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "a", path)


# -- the tests ---------------------------------------------------------------------------------------------
def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    validate(DOC)  # picks the 3.1 validator from the document's version


def test_the_document_is_versioned_from_the_package() -> None:
    assert DOC["info"]["version"] == version("playbus")


def test_every_path_the_ingress_routes_is_described() -> None:
    described = [_template(p) for p in DOC["paths"]]
    samples = routed_samples()
    # the pattern reader works
    assert {"/v1/campaigns/A/budgets/x/topup", "/v1/scripts/A/backtest", "/v1/campaigns/x/users/x/decisions"} <= samples
    missing = sorted(s for s in samples if not any(t.match(s) for t in described))
    assert not missing, f"routed but not in the OpenAPI document (actors/service/openapi.py): {missing}"
    literals = routed_literals()
    assert {"/v1/events", "/healthz", "/v1/shards"} <= literals
    exact = sorted(lit for lit in literals if not lit.endswith("/") and lit not in DOC["paths"])
    assert not exact, f"paths compared in the routing code but not in the OpenAPI document: {exact}"
    prefixes = sorted(lit for lit in literals if lit.endswith("/")
                      if not any(_instance(p).startswith(lit) for p in DOC["paths"]))
    assert not prefixes, f"path prefixes routed but nothing under them is described: {prefixes}"


def test_every_described_path_is_routed() -> None:
    patterns, literals = routed_patterns(), routed_literals()
    phantom = sorted(p for p in DOC["paths"] if p not in literals
                     and not any(r.match(_instance(p)) for r in patterns))
    assert not phantom, f"described but routed nowhere: {phantom}"


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOC["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def test_admin_operations_need_the_bearer_token_and_the_others_do_not() -> None:
    assert DOC["components"]["securitySchemes"]["adminToken"] == {**DOC["components"]["securitySchemes"][
        "adminToken"], "type": "http", "scheme": "bearer"}
    public = re.compile(http_api._CTX.pattern)
    for path, method, op in operations():
        admin = path.startswith(http_api._ADMIN) and not public.match(_instance(path))
        assert ("security" in op) == admin, (method, path)
        assert ("401" in op["responses"]) == admin, (method, path)


def test_every_operation_documents_its_errors_and_the_retry_after_of_503() -> None:
    unavailable = DOC["components"]["responses"]["Unavailable"]
    assert unavailable["headers"]["Retry-After"]["$ref"] == "#/components/headers/RetryAfter"
    for path, method, op in operations():
        codes = set(op["responses"])
        assert codes & {"200", "201", "202"}, (method, path)
        if "requestBody" in op:
            assert "413" in codes, (method, path)
        if not path.startswith(("/docs", "/openapi")):
            assert "503" in codes, (method, path)
            assert "headers" in op["responses"]["503"] or "$ref" in op["responses"]["503"], (method, path)
        for code, resp in op["responses"].items():
            if code.startswith(("4", "5")) and "$ref" not in resp and path != "/healthz":  # its 503 is its report
                schema = resp["content"]["application/json"]["schema"]["$ref"]
                assert DOC["components"]["schemas"][schema.rsplit("/", 1)[1]]["required"][0] == "error", (code, path)


def _examples() -> Iterator[tuple[str, dict[str, Any], Any]]:
    for path, method, op in operations():
        where = f"{method.upper()} {path}"
        for media, content in op.get("requestBody", {}).get("content", {}).items():
            if "example" in content:
                yield f"{where} request {media}", content["schema"], content["example"]
        for code, resp in op["responses"].items():
            for media, content in resp.get("content", {}).items():
                if "example" in content:
                    yield f"{where} {code} {media}", content["schema"], content["example"]
        for p in op.get("parameters", []):
            if "example" in p:
                yield f"{where} parameter {p['name']}", p["schema"], p["example"]
    for name, schema in DOC["components"]["schemas"].items():
        for example in schema.get("examples", []):
            yield f"schema {name}", {"$ref": f"#/components/schemas/{name}"}, example


def test_every_example_matches_its_schema() -> None:
    checked = 0
    for where, schema, example in _examples():
        root = {**schema, "components": DOC["components"]}  # so that "#/components/..." resolves
        errors = list(jsonschema.Draft202012Validator(root).iter_errors(example))
        assert not errors, f"{where}: {errors[0].message}"
        checked += 1
    assert checked > 50


def test_the_document_and_the_page_are_served_without_a_token() -> None:
    docs = ApiDocs(key_groups=16)
    status, headers, body = docs.handle("GET", "/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == json.loads(json.dumps(DOC))
    status, headers, page = docs.handle("GET", "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = page.decode()
    assert 'url: "/openapi.json"' in html and "https://" not in html.replace("http://", "")  # no CDN
    loaded = re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', html)
    assert {u.rsplit("/", 1)[1] for u in loaded} == set(ASSETS)


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_each_asset_of_the_page_is_served_from_the_installed_swagger_ui(name: str) -> None:
    status, headers, content = ApiDocs(16).handle("GET", f"/docs/assets/{name}")
    assert status == 200, content
    assert headers["content-type"] == ASSETS[name]
    assert len(content) > 300
    if name == "swagger-ui-bundle.js":
        # Swagger UI 5 renders OpenAPI 3.1 (4.x refuses it)
        found = re.search(rb'PACKAGE_VERSION:"(\d+)\.', content)
        assert found and int(found.group(1)) >= 5, found


@pytest.mark.parametrize("path", ["/docs/assets/index.html", "/docs/assets/..%2F..%2Fsetup.py",
                                  "/docs/assets/../openapi.json", "/docs/", "/docs/assets/"])
def test_anything_else_under_docs_is_404(path: str) -> None:
    status, headers, body = ApiDocs(16).handle("GET", path)
    assert status == 404 and headers["content-type"] == "application/json"
    assert "error" in json.loads(body)


def test_the_docs_endpoints_answer_405_to_other_methods() -> None:
    assert ApiDocs(16).handle("POST", "/openapi.json")[0] == 405

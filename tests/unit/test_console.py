"""The operators' console (`GET /ui/`): the ingress serves the page and its files from the package, with their content
types and a policy that loads nothing from elsewhere; nothing outside the folder is served; the page is plain files of
ours (no build step, no library, no CDN), every module it imports is there, and it calls only endpoints that
/openapi.json describes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from playbus.actors.service.console import CONSOLE_DIR, CONTENT_TYPES, Console
from playbus.actors.service.openapi import document

FILES = sorted(p.name for p in CONSOLE_DIR.iterdir())


def test_the_page_is_served_at_ui_with_a_policy_that_allows_only_this_origin() -> None:
    for path in ("/ui/", "/ui"):
        status, headers, body = Console().handle("GET", path)
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert body == (CONSOLE_DIR / "index.html").read_bytes()
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", FILES)
def test_each_file_is_served_with_its_content_type(name: str) -> None:
    status, headers, body = Console().handle("GET", f"/ui/{name}")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPES[Path(name).suffix]
    assert body == (CONSOLE_DIR / name).read_bytes()


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/../console.py", "/ui/..%2Fconsole.py", "/ui/sub/app.js",
                                  "/ui/.hidden.js", "/ui/app.py", "/ui/app.js/", "/ui//etc/passwd"])
def test_nothing_else_is_served(path: str) -> None:
    status, headers, body = Console().handle("GET", path)
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"].startswith("no such file")


def test_other_methods_are_refused() -> None:
    assert Console().handle("POST", "/ui/")[0] == 405


def test_the_folder_holds_only_files_the_console_serves() -> None:
    assert {"index.html", "app.js", "app.css"} <= set(FILES)
    assert all(Path(n).suffix in CONTENT_TYPES for n in FILES), FILES


def _text(name: str) -> str:
    return (CONSOLE_DIR / name).read_text(encoding="utf-8")


def test_nothing_is_loaded_from_elsewhere() -> None:
    for name in FILES:
        text = _text(name)
        # no absolute URL other than the SVG namespace; no inline script or handler in the page (the policy forbids)
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (name, urls)
    page = _text("index.html")
    assert re.findall(r"<script[^>]*>", page) == ['<script type="module" src="/ui/app.js">']
    assert not re.search(r"\son[a-z]+=", page) and "style=" not in page


def test_every_module_imported_is_in_the_folder() -> None:
    for name in FILES:
        if name.endswith(".js"):
            for imported in re.findall(r'from "\./([^"]+)"', _text(name)):
                assert (CONSOLE_DIR / imported).is_file(), (name, imported)


def test_api_answers_are_never_parsed_as_markup() -> None:
    for name in FILES:
        if name.endswith(".js"):
            text = _text(name)
            assert "innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text, name
            assert "eval(" not in text and "new Function" not in text, name


def test_the_console_calls_only_described_endpoints() -> None:
    described = [re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$")
                 for p in document(key_groups=16)["paths"]]
    called = set()
    for name in FILES:
        if name.endswith(".js"):
            for path in re.findall(r'["`](/v1/[^"`?]*)', _text(name)):
                called.add(re.sub(r"\$\{[^}]+\}", "x", path))
    assert {"/v1/campaigns", "/v1/scripts/x/backtest", "/v1/failed/replay", "/v1/shards"} <= called
    undescribed = sorted(p for p in called if not any(d.match(p) for d in described))
    assert not undescribed, undescribed

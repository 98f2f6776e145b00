"""ApiDocs: the described API, served by the ingress without a token (plain Python).

    GET /openapi.json         the OpenAPI 3.1 document (openapi.py), built once per replica
    GET /docs                 its rendered reference: a page of ours that runs Swagger UI on /openapi.json
    GET /docs/assets/{file}   Swagger UI's files, read from the `swagger-ui-py` distribution (a dependency): the
                              machines reach no CDN, and no JavaScript library is copied into this repository
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from playbus.actors.service.openapi import document, package_version
from playbus.actors.service.replies import Response, error, reply

__all__ = ["ASSETS", "ApiDocs", "assets_dir"]

# The Swagger UI files the page loads, with their content types; nothing else of the distribution is served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
_ASSET = re.compile(r"^/docs/assets/([A-Za-z0-9_.\-]+)$")
_CACHE = {"cache-control": "public, max-age=3600"}

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>playbus HTTP API {version}</title>
  <link rel="icon" type="image/png" sizes="32x32" href="/docs/assets/favicon-32x32.png">
  <link rel="icon" type="image/png" sizes="16x16" href="/docs/assets/favicon-16x16.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <style>body {{ margin: 0; }}</style>
</head>
<body>
  <main id="swagger-ui" aria-label="playbus HTTP API reference"></main>
  <noscript>This reference needs JavaScript; the raw description is at <a href="/openapi.json">/openapi.json</a>.
  </noscript>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      layout: "BaseLayout",
      presets: [SwaggerUIBundle.presets.apis],
      defaultModelsExpandDepth: 0,
      validatorUrl: null
    }});
  </script>
</body>
</html>
"""


def assets_dir() -> Path | None:
    """Where the installed `swagger-ui-py` keeps Swagger UI's files (found without importing the package)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "static"


class ApiDocs:
    """The docs endpoints of one ingress replica; `key_groups`: the cluster's (the document's most shards)."""

    def __init__(self, key_groups: int) -> None:
        self.key_groups = key_groups
        self._spec: Response | None = None
        self._files: dict[str, bytes] = {}

    @staticmethod
    def serves(path: str) -> bool:
        return path in ("/openapi.json", "/docs") or path.startswith("/docs/")

    def handle(self, method: str, path: str) -> Response:
        if method != "GET":
            return error(405, f"{method} is not allowed on {path}: use GET")
        if path == "/openapi.json":
            if self._spec is None:
                self._spec = reply(200, document(self.key_groups))
            return self._spec
        if path == "/docs":
            page = PAGE.format(version=package_version()).encode()
            return 200, {"content-type": "text/html; charset=utf-8", "cache-control": "no-cache"}, page
        m = _ASSET.match(path)
        name = m.group(1) if m else ""
        if name not in ASSETS:
            return error(404, f"no such file: {path}")
        content = self._files.get(name)
        if content is None:
            folder = assets_dir()
            if folder is None or not (folder / name).is_file():
                return error(404, f"{name}: Swagger UI's files are not installed (the swagger-ui-py package)")
            content = self._files[name] = (folder / name).read_bytes()
        return 200, {"content-type": ASSETS[name], **_CACHE}, content

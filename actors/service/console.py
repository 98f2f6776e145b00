"""Console: the operators' web page (`GET /ui/`), static files of ours served by the ingress without a token.

    GET /ui/, /ui      index.html (it names its files by absolute paths, so it works from either)
    GET /ui/{file}     a file of the folder console/ beside this module (plain HTML, CSS and JavaScript modules:
                       no build step, no framework, nothing loaded from the internet)
The page asks the operator for an admin token and does everything through the admin API (docs/http-api.md), the
same endpoints the `playbus` command uses: it has no back end of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from playbus.actors.service.replies import Response, error

__all__ = ["CONSOLE_DIR", "CONTENT_TYPES", "Console"]

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_FILE = re.compile(r"^/ui/([A-Za-z0-9_\-][A-Za-z0-9_.\-]*)$")  # a file of the folder itself: no "/", no "..", no ".x"
# Everything from this origin, nothing inline, nothing elsewhere: API answers are shown as text, never as markup.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
            "content-security-policy": _CSP}


class Console:
    """The console's files (the folder ships in the wheel), read at each request: a few small files, and an edited
    one is served at once."""

    def __init__(self, folder: Path = CONSOLE_DIR) -> None:
        self.folder = folder

    @staticmethod
    def serves(path: str) -> bool:
        return path == "/ui" or path.startswith("/ui/")

    def handle(self, method: str, path: str) -> Response:
        if method != "GET":
            return error(405, f"{method} is not allowed on {path}: use GET")
        if path in ("/ui", "/ui/"):
            name = "index.html"
        else:
            m = _FILE.match(path)
            if m is None or Path(m.group(1)).suffix not in CONTENT_TYPES or ".." in m.group(1):
                return error(404, f"no such file: {path}")
            name = m.group(1)
        file = self.folder / name
        if not file.is_file():
            return error(404, f"no such file: {path}")
        content = file.read_bytes()
        headers = {"content-type": CONTENT_TYPES[Path(name).suffix], **_HEADERS}
        return 200, headers, content

"""The browser page at `/`: static HTML, JavaScript and CSS from service/static, no build step.
The page calls only the public API, so it is a client like any other."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

# everything the page loads comes from this origin; images also arrive as data: URLs (API
# responses) and blob: URLs (the user's own files, shown before upload)
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The page itself; its assets are under /static."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """The page's assets, for mounting at /static."""
    return StaticFiles(directory=STATIC_DIR)

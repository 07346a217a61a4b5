"""Render a curve written by `python -m composer curve RUN --out FILE.html` to a PNG, with the
Chromium the browser tests use (plotly's own PNG export needs kaleido, which is not installed here).

    python bench/render_curve.py curve.html docs/cifar_curve.png
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def render(html: Path, png: Path, width: int = 1000, height: int = 600) -> None:
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(Path(html).resolve().as_uri())
        page.wait_for_selector(".plotly .main-svg")
        page.screenshot(path=str(png))
        browser.close()


if __name__ == "__main__":
    render(Path(sys.argv[1]), Path(sys.argv[2]))

"""The app in a real browser (Debian's Chromium driven by Playwright), as the README promises it to
a newcomer: it opens on the starter family (no click needed), click two blocks to add a stitch,
drag it, fit, fine-tune, watch the curve grow, click a point, download the stitch and load it; then
a plan edit keeps the trained run, which reopens from "earlier runs", and a reload shows the
server's state. Along the way: the members table fits a 1400 px window, a typed 2.5 is refused (not
rounded), and the graph's banner never contradicts the status line. Screenshots of each stage go
to artifacts/browser/.

Needs `apt-get install -y chromium` and `pip install playwright` (never `playwright install`).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from tests.test_app_api import free_port, starter  # noqa: F401  (the shared starter fixture)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser_page(starter, tmp_path_factory):  # noqa: F811
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from composer.ui import build_app, launch
    from composer.ui.session import AppConfig
    tmp = tmp_path_factory.mktemp("browser")
    config = AppConfig(runs_root=tmp / "runs", exports_dir=tmp / "exports", data_roots=[], model_roots=[],
                       eval_limit=100)
    demo = build_app(config)
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp / "profile"), executable_path=CHROMIUM, headless=True, accept_downloads=True,
            viewport={"width": 1400, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"http://127.0.0.1:{port}/")
        yield page, demo, config, errors, requests
        ctx.close()
    demo.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def center(locator) -> tuple[float, float]:
    box = locator.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def graph_message(page) -> str:
    return page.locator("#zc-graph .zc-graph-msg").inner_text()


def status_text(page) -> str:
    return page.locator("#zc-status").inner_text()


def test_stitch_fit_finetune_pick_download(browser_page, tmp_path):
    page, demo, config, errors, requests = browser_page
    page.wait_for_selector("#zc-graph .zc-graph-msg", timeout=60_000)
    page.wait_for_url("**/?session=*", timeout=30_000)   # a reload finds this session again
    shot(page, "0-start")

    # 1. the page opens on the starter family by itself (building it on first use, with progress)
    page.wait_for_selector("#zc-graph .zc-unit", timeout=180_000)
    assert page.locator("#zc-graph .zc-edge").count() == 20
    assert "Starter" in page.get_by_role("combobox", name="family").input_value()
    assert "23 stitches" in status_text(page)
    # the members table fits its column in a 1400 px window: every column visible, nothing cut off
    fits = page.evaluate("""() => {
        const t = document.querySelector('#zc-members table');
        let box = t.parentElement;
        while (box && box.scrollWidth <= box.clientWidth + 1 && box.id !== 'zc-members') box = box.parentElement;
        const last = [...t.querySelectorAll('th')].pop().getBoundingClientRect();
        const col = document.querySelector('#zc-members').getBoundingClientRect();
        return {overflow: box && box.id !== 'zc-members', lastRight: last.right, colRight: col.right};
    }""")
    assert not fits["overflow"] and fits["lastRight"] <= fits["colRight"] + 1, fits
    shot(page, "1-family")

    # 2. stitch by hand: a click on a larger anchor first is refused with the reason on the graph
    unit = lambda a, u: page.locator(f'#zc-graph .zc-unit[data-anchor="{a}"][data-part="{u}"]')  # noqa: E731
    unit(1, 0).click()
    unit(0, 3).click()
    page.wait_for_function("document.querySelector('#zc-graph .zc-graph-msg').textContent.includes('wrong way')")
    assert page.locator("#zc-graph .zc-graph-msg.zc-error").count() == 1
    shot(page, "2-refused")
    # a newer action elsewhere (export before any fit): its refusal is the one line shown, and
    # the graph no longer repeats the older one
    page.get_by_role("button", name="Export whole SN-Net (zip)").click()
    page.wait_for_function("document.querySelector('#zc-status').innerText.includes('fit (and ideally fine-tune) first')")
    page.wait_for_function("!document.querySelector('#zc-graph .zc-graph-msg').textContent.includes('wrong way')")
    shot(page, "2b-newer-refusal")
    unit(0, 0).click()
    unit(1, 3).click()
    page.wait_for_selector('#zc-graph .zc-edge[data-point="0,0,1,3"]')
    assert page.locator("#zc-graph .zc-edge").count() == 21
    shot(page, "3-added")

    # drag the new stitch's back end from small block 3 to small block 2
    handle = page.locator('#zc-graph .zc-edge[data-point="0,0,1,3"] .zc-handle[data-end="back"]')
    x0, y0 = center(handle)
    x1, y1 = center(unit(1, 2))
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    page.wait_for_selector('#zc-graph .zc-edge[data-point="0,0,1,2"]')
    assert page.locator('#zc-graph .zc-edge[data-point="0,0,1,3"]').count() == 0
    assert "moved" in graph_message(page)
    shot(page, "4-dragged")

    # 3. fit: edges get R^2 colours, the curve appears
    page.get_by_label("calibration images").fill("64")
    page.get_by_label("evaluation images").fill("100")
    page.get_by_role("button", name="Fit and evaluate").click()
    page.wait_for_selector("#zc-curve .zc-curve-plot .scatterlayer .point", timeout=120_000)
    assert "fitted" in graph_message(page)
    assert page.locator("#zc-graph .zc-legend").count() == 1
    n_points = page.locator("#zc-curve .scatterlayer .point").count()
    assert n_points >= 24                                  # 24 stitches (+ the selected ring, if any)
    shot(page, "5-fitted")

    # 4. fine-tune: a typed 2.5 is refused, not rounded; then 12 steps to add
    page.get_by_label("steps to add").fill("2.5")
    page.get_by_role("button", name="Start / resume").click()
    page.wait_for_function("document.querySelector('#zc-status').innerText.includes('whole number')")
    assert "2.5" in status_text(page)
    # progress bar moves, the curve is redrawn from the evaluations as they come
    page.get_by_label("steps to add").fill("12")
    page.get_by_label("batch", exact=True).fill("16")
    page.get_by_label("evaluate every (steps)").fill("4")
    page.get_by_role("button", name="Start / resume").click()
    # a mid-run evaluation (step 4 or 8) redraws the curve while the job still runs
    page.wait_for_function("document.querySelector('#zc-curve .gtitle') && "
                           "/fine-tuning, step [48]$/.test(document.querySelector('#zc-curve .gtitle').textContent)",
                           timeout=120_000)
    shot(page, "6-training")
    page.wait_for_selector(".zc-progress[data-state='done']", timeout=180_000)
    assert "step 12 / 12" in page.locator(".zc-progress").inner_text()
    page.wait_for_function("document.querySelector('#zc-curve .gtitle').textContent.includes('step 12')",
                           timeout=30_000)
    shot(page, "7-trained")

    # 5. click a point: the stitch it stands for is selected and its route lit on the graph
    page.locator("#zc-curve").scroll_into_view_if_needed()   # a mouse click lands inside the viewport only
    # the stitch point furthest from every other marker, so that the click cannot land on a neighbour
    target = page.evaluate("""() => {
        const gd = document.querySelector('#zc-curve .zc-curve-plot');
        const t = gd._fullData.findIndex(d => d.name === 'stitches');
        const traces = [...gd.querySelectorAll('.scatterlayer .trace')];
        const centre = (e) => { const b = e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; };
        const all = traces.flatMap(tr => [...tr.querySelectorAll('.point')].map(centre));
        const mine = [...traces[t].querySelectorAll('.point')].map(centre);
        let best = 0, room = -1;
        mine.forEach((c, i) => {
            const d = Math.min(...all.filter(o => o !== c && (o[0] !== c[0] || o[1] !== c[1]))
                                     .map(o => Math.hypot(o[0] - c[0], o[1] - c[1])));
            if (d > room) { room = d; best = i; }
        });
        return {trace: t, index: best, id: gd._fullData[t].customdata[best]};
    }""")
    point = page.locator("#zc-curve .scatterlayer .trace").nth(target["trace"]).locator(".point").nth(target["index"])
    px, py = center(point)
    page.mouse.move(px, py)          # plotly picks the clicked point from the last hover
    page.wait_for_timeout(300)
    page.mouse.click(px, py)
    page.wait_for_function(f"document.body.innerText.includes('Selected stitch {target['id']}')", timeout=30_000)
    assert page.locator("#zc-graph .zc-edge.zc-on-route").count() == 1
    assert page.locator("#zc-graph .zc-block.zc-on-route").count() >= 4
    shot(page, "8-picked")

    # 6. download the selected stitch and load it
    page.get_by_role("button", name="Export selected stitch (zip)").click()
    page.wait_for_function("/exported|⚠/.test(document.querySelector('#zc-status').innerText)", timeout=120_000)
    status = page.locator("#zc-status").inner_text()
    assert "exported" in status, status
    link = page.locator(f"a[data-testid=download-link][href*='/stitch-{target['id']}-']")
    link.wait_for(timeout=120_000)
    with page.expect_download() as dl:
        link.click()
    zip_path = tmp_path / "stitch.zip"
    dl.value.save_as(zip_path)
    shot(page, "9-downloaded")
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(tmp_path / "unzipped")
    folder = next((tmp_path / "unzipped").iterdir())
    from composer import load_stitched
    from composer.run import load_run
    model = load_stitched(folder)
    run_dir = next(Path(config.runs_root).glob("*/run-*"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_run(run_dir).net.eval().select(target["id"])(x))

    # 7. a plan edit keeps the trained run (the status says so); "earlier runs" reopens it as it was
    unit(0, 1).click()
    unit(1, 3).click()
    page.wait_for_function("document.querySelector('#zc-status').innerText.includes('is kept')")
    assert "run-1 (fine-tuned to step 12) is kept" in status_text(page)
    page.wait_for_selector("#zc-curve .zc-curve-empty", state="visible")
    shot(page, "10-edited")
    page.get_by_role("combobox", name="earlier runs of this session (choose one to reopen it)").click()
    page.get_by_role("option", name="run-1").click()
    page.wait_for_function("document.querySelector('#zc-status').innerText.includes('reopened run-1')")
    page.wait_for_selector("#zc-curve .zc-curve-plot .scatterlayer .point", timeout=30_000)
    page.wait_for_function("document.querySelector('#zc-curve .gtitle').textContent.includes('after 12 steps')")
    assert f"Selected stitch {target['id']}" in page.locator("body").inner_text()
    shot(page, "11-reopened")

    # 8. a reload shows what the server holds: the run, its fine-tune, the form as started, the exports
    page.reload()
    page.wait_for_selector("#zc-curve .zc-curve-plot .scatterlayer .point", timeout=60_000)
    page.wait_for_selector(".zc-progress[data-state='done'][data-step='12']", timeout=30_000)
    assert page.get_by_label("steps to add").input_value() == "12"
    assert page.get_by_label("batch", exact=True).input_value() == "16"
    assert page.locator(f"a[data-testid=download-link][href*='/stitch-{target['id']}-']").count() == 1
    shot(page, "12-reloaded")

    assert not errors, errors
    external = [u for u in requests if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
    assert not external, external                          # offline: no CDN, no fonts from elsewhere

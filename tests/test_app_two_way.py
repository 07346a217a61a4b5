"""Two-way stitching (SN-Netv2) in the app (issue 16): choosing a two-way plan for two anchors,
drawing routes that go there and back, and adding, moving and removing routes by clicking blocks;
then fitting, reopening and exporting such a run.

The family is three tiny random ViTs of depth 4 (widths 16 / 24 / 32) saved as local-dir anchors,
and a 3-class folder of random images: a plan costs milliseconds on the meta device, a fit seconds.
For two equal-depth anchors SN-Netv2's points are small->large (0,1) (1,2) (2,3) and large->small
(0,1) (1,2) (2,3) (front block, first back block; composer.plan.two_way_points), so its plan has
2 anchors + 3 + 3 one-link routes + 3 small->large->small + 3 large->small->large = 14 routes:
a there-and-back route needs its second link to leave at or after the block the first entered,
(0,1) then (1,2) or (2,3), (1,2) then (2,3): 3 pairs each way.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from composer.errors import UserError
from composer.plan import Segment
from composer.routes import routes_plan
from composer.ui import views
from composer.ui.session import AppConfig, AppError, Session
from tests.engine_models import tiny_vit_zoo

SNNETV2_ROUTES = 14          # worked out in the module docstring
SNNETV2_LINKS = 6            # 3 small->large + 3 large->small stitch points, one layer each


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(folder of the three local-dir ViTs, their specs by width, the 3-class image folder)."""
    root = tmp_path_factory.mktemp("two_way_zoo")
    specs, data = tiny_vit_zoo(root / "models", dims=(16, 24, 32), depth=4, per_class=4)
    return root / "models", specs, data


def _session(zoo, tmp_path: Path, anchors: int = 2) -> Session:
    models, specs, data = zoo
    config = AppConfig(runs_root=tmp_path / "runs", exports_dir=tmp_path / "exports", data_roots=[data],
                       model_roots=[models], eval_limit=12)
    s = Session("two-way-test-session-key", config)
    s.custom_family(", ".join(specs[:anchors]))
    s.choose_family("custom")
    return s


def _two_way(zoo, tmp_path) -> Session:
    s = _session(zoo, tmp_path)
    s.set_two_way(True)
    return s


def _routes(s: Session) -> list[list[tuple[int, int, int]]]:
    return [[(g.anchor, g.first, g.last) for g in st.route] for st in s.plan.stitches if not st.is_anchor]


def _graph(s: Session) -> dict:
    return views.graph_value(s.plan, s.r2, s.selected, s.message, s.error)


# --- choosing a two-way plan ---------------------------------------------------------------------------

def test_two_way_plan_has_snnetv2s_routes_both_ways(zoo, tmp_path):
    s = _session(zoo, tmp_path)
    assert len(s.plan.stitches) == 2 + 10        # SN-Net's one-way default first (kernel 2: 10 stitches)
    s.set_two_way(True)
    assert s.two_way and s.plan.options["two_way"] and len(s.plan.stitches) == SNNETV2_ROUTES
    assert "two-way (SN-Netv2)" in s.message and "click blocks to add a route" in s.message
    there_and_back = [r for r in _routes(s) if len(r) == 3]
    assert sorted(there_and_back) == sorted([
        [(0, 0, 0), (1, 1, 1), (0, 2, 3)], [(0, 0, 0), (1, 1, 2), (0, 3, 3)], [(0, 0, 1), (1, 2, 2), (0, 3, 3)],
        [(1, 0, 0), (0, 1, 1), (1, 2, 3)], [(1, 0, 0), (0, 1, 2), (1, 3, 3)], [(1, 0, 1), (0, 2, 2), (1, 3, 3)]])
    g = _graph(s)
    assert g["two_way"] is True and len(g["edges"]) == SNNETV2_LINKS
    forward = sorted(e["point"] for e in g["edges"] if e["point"][0] < e["point"][2])
    back = sorted(e["point"] for e in g["edges"] if e["point"][0] > e["point"][2])
    assert forward == [[0, 0, 1, 1], [0, 1, 1, 2], [0, 2, 1, 3]]
    assert back == [[1, 0, 0, 1], [1, 1, 0, 2], [1, 2, 0, 3]]
    count = views.plan_count_md(s.plan)
    assert "**14 stitches**" in count and "6 one-link routes + 6 there and back" in count and "SN-Netv2" in count
    # what the fit rebuilds: SN-Netv2's enumeration itself
    assert s.plan_options() == {"two_way": True}
    # and back to one-way: SN-Net's defaults again
    s.set_two_way(False)
    assert not s.two_way and len(s.plan.stitches) == 12 and "two_way" not in s.plan.options
    assert _graph(s)["two_way"] is False


def test_a_there_and_back_route_is_drawn_as_two_links_in_order(zoo, tmp_path):
    s = _two_way(zoo, tmp_path)
    sid = next(st.id for st in s.plan.stitches if [(g.anchor, g.first, g.last) for g in st.route]
               == [(1, 0, 0), (0, 1, 2), (1, 3, 3)])
    s.select(sid)
    route = _graph(s)["route"]
    # leave the large anchor after block 0, run small blocks 1..2, come back for large block 3
    assert route["edges"] == [[1, 0, 0, 1], [0, 2, 1, 3]]
    assert route["nodes"] == [[1, "stem"], [1, 0], [0, 1], [0, 2], [1, 3], [1, "head"]]
    assert route["text"].count("->") == 2
    links = {tuple(e["point"]) for e in _graph(s)["edges"]}
    assert {tuple(e) for e in route["edges"]} <= links          # both links are edges the graph draws


def test_two_way_needs_exactly_two_anchors_and_keeps_the_plan_when_refused(zoo, tmp_path):
    s = _session(zoo, tmp_path, anchors=3)
    before = s.plan
    with pytest.raises(AppError, match="exactly two anchors, and 3 are ticked: tick two"):
        s.set_two_way(True)
    assert not s.two_way and s.plan is before
    with pytest.raises(AppError, match="true or false"):
        s.set_two_way("yes")
    s.set_anchors(s.specs[:2])
    s.set_two_way(True)
    plan = s.plan
    with pytest.raises(AppError, match="joins exactly two anchors, and 3 are ticked"):
        s.set_anchors(list(s.member_infos))
    assert s.plan is plan and len(s.specs) == 2 and s.two_way
    with pytest.raises(AppError, match="untick 'two-way'"):
        s.set_options(1, 1, False)
    assert s.plan is plan
    s.reset_plan()                                           # SN-Net's defaults: one-way again
    assert not s.two_way and "tick 'two-way' again" in s.message and len(s.plan.stitches) == 12
    s.set_two_way(True)
    s.choose_family("custom")                                # a family chosen again starts one-way
    assert not s.two_way


# --- adding routes by clicking blocks -------------------------------------------------------------------

def test_add_routes_by_clicked_blocks(zoo, tmp_path):
    s = _two_way(zoo, tmp_path)
    layers = dict(s.plan.layers)
    # there and back: leave small after block 0, enter large at 2, leave it after 3, back to small at 3
    s.add_route([[0, 0], [1, 2], [1, 3], [0, 3]])
    assert "added" in s.message and s.message.count("->") == 2
    new = s.plan.stitches[-1]
    assert new.route == (Segment(0, 0, 0), Segment(1, 2, 3), Segment(0, 3, 3))
    assert new.layers == ("a0_a1_v2_0_2", "a1_a0_v2_3_3")    # two new links, one layer per direction and point
    assert s.plan.options.get("custom_routes") and len(s.plan.stitches) == SNNETV2_ROUTES + 1
    assert set(layers) < set(s.plan.layers)                 # SN-Netv2's own layers kept, by the same keys
    # one link, large -> small (a one-way plan would refuse that direction)
    s.add_route([[1, 0], [0, 2]])
    assert s.plan.stitches[-1].route == (Segment(1, 0, 0), Segment(0, 2, 3))
    # the graph endpoint for two blocks adds a link in either direction too
    s.add_stitch((1, 1), (0, 3))
    assert s.plan.stitches[-1].route == (Segment(1, 0, 1), Segment(0, 3, 3))
    # a route added by hand through an existing link shares its layer
    s.add_route([[0, 0], [1, 1], [1, 3], [0, 3]])
    assert s.plan.stitches[-1].layers == ("a0_a1_v2_0_1", "a1_a0_v2_3_3")   # SN-Netv2's link, then the one added above
    g = _graph(s)
    assert [0, 0, 1, 2] in [e["point"] for e in g["edges"]] and [1, 3, 0, 3] in [e["point"] for e in g["edges"]]
    # what the fit rebuilds: exactly these routes, the same plan
    options = s.plan_options()
    assert set(options) == {"routes"} and len(options["routes"]) == len(s.plan.stitches) - 2
    again = routes_plan(s.infos, json.loads(json.dumps(options["routes"])))
    assert again.to_json() == s.plan.to_json()
    assert "edited by hand" in views.plan_count_md(s.plan)


BAD_CLICKS = [
    ([[0, 1]], "got 1"),
    ([[0, 1], [1, 2], [1, 3]], "also click where it comes back"),
    ([[0, 1], [1, 1], [1, 2], [0, 3], [1, 3]], "got 5"),
    ([[0, 1], [0, 2]], "stays in one anchor"),
    ([[0, 1], [1, 2], [0, 2], [0, 3]], "the third block, where it leaves, must be in"),
    ([[0, 1], [1, 2], [1, 3], [1, 0]], "the fourth block must be in"),
    ([[0, 0], [1, 3], [1, 2], [0, 3]], "enters vit24 at block 3, so it leaves at block 3 or later, not 2"),
    ([[0, 2], [1, 1], [1, 2], [0, 1]], "runs vit16 blocks 0..2 before it leaves, so it comes back at block 3 or "
                                       "later, not 1"),
    ([[0, 9], [1, 1]], "a block of vit16 must be between 0 and 3, got 9"),
    ([[5, 1], [1, 1]], "an anchor must be between 0 and 1, got 5"),
    ([[0, 1.5], [1, 2]], "must be a whole number"),
    ([[0, 1, 2], [1, 2]], "a block is [anchor, block]"),
    ("0,1,1,2", "must be a list"),
    ([[0, 1], [1, 2], [1, 2], [0, 3]], "that route already exists"),     # SN-Netv2 has it
]


@pytest.mark.parametrize("points, message", BAD_CLICKS, ids=[m[:30] for _, m in BAD_CLICKS])
def test_bad_clicks_are_refused_with_what_to_do_and_change_nothing(zoo, tmp_path, points, message):
    s = _two_way(zoo, tmp_path)
    before = s.plan.to_json()
    with pytest.raises(UserError) as e:
        s.add_route(points)
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and s.plan.to_json() == before


def test_there_and_back_needs_a_two_way_plan(zoo, tmp_path):
    s = _session(zoo, tmp_path)
    with pytest.raises(AppError, match="needs a two-way plan: tick 'two-way"):
        s.add_route([[0, 0], [1, 2], [1, 3], [0, 3]])
    s.add_route([[0, 0], [1, 3]])        # two blocks in a one-way plan: a one-way stitch, as add_stitch
    assert s.plan.stitches[-1].route == (Segment(0, 0, 0), Segment(1, 3, 3))
    with pytest.raises(UserError, match="smaller to a larger anchor"):
        s.add_route([[1, 0], [0, 2]])


def test_a_link_across_stages_is_refused(tmp_path):
    """CIFAR ResNet-20 and -32 (three stages of 3 and 5 blocks), on the meta device: a link stays in one stage."""
    config = AppConfig(runs_root=tmp_path / "runs", exports_dir=tmp_path / "exports")
    s = Session("two-way-test-session-key", config)
    s.custom_family("cifar_resnet20, cifar_resnet32")
    s.choose_family("custom")
    s.set_two_way(True)
    assert len(s.plan.stitches) > 2 and s.plan.options["two_way"]
    with pytest.raises(UserError, match="is in stage 0 but cifar_resnet32 block 7 is in stage 1"):
        s.add_route([[0, 1], [1, 7]])
    s.add_route([[0, 1], [1, 3]])        # both in stage 0
    assert s.plan.stitches[-1].route == (Segment(0, 0, 1), Segment(1, 3, 14))


# --- moving and removing links --------------------------------------------------------------------------

def test_removing_a_link_removes_every_route_through_it(zoo, tmp_path):
    s = _two_way(zoo, tmp_path)
    # small block 1 -> large block 2 carries its own route, (1,0,0)->(0,1,1)->(1,2,3)'s second link, and
    # (0,0,1)->(1,2,2)->(0,3,3)'s first
    s.remove_stitch([0, 1, 1, 2])
    assert "and the 3 routes through it" in s.message
    assert len(s.plan.stitches) == SNNETV2_ROUTES - 3
    assert [0, 1, 1, 2] not in [e["point"] for e in _graph(s)["edges"]]
    with pytest.raises(AppError, match="not in the plan"):
        s.remove_stitch([0, 1, 1, 2])


def test_moving_a_link_end_moves_it_in_every_route_through_it(zoo, tmp_path):
    s = _two_way(zoo, tmp_path)
    # large block 2 -> small block 3: its own route and the second links of two there-and-back routes
    s.move_stitch([1, 2, 0, 3], "front", [1, 3])
    assert "moved vit24 block 2 -> vit16 block 3 to vit24 block 3 -> vit16 block 3" in s.message
    routes = _routes(s)
    assert [(1, 0, 3), (0, 3, 3)] in routes and [(1, 0, 2), (0, 3, 3)] not in routes
    assert [(0, 0, 0), (1, 1, 3), (0, 3, 3)] in routes and [(0, 0, 1), (1, 2, 3), (0, 3, 3)] in routes
    assert len(routes) == SNNETV2_ROUTES - 2
    # a move that would leave a segment running backwards names the route and what to do; nothing changes
    before = s.plan.to_json()
    with pytest.raises(AppError, match=r"would break the route vit16\[0..1\] -> vit24\[2..3\] -> vit16\[3..3\] "
                                       r"\(vit24 blocks 2..1 are not a run of its blocks 0..3\): remove that route first"):
        s.move_stitch([1, 3, 0, 3], "front", [1, 1])
    with pytest.raises(AppError, match="moves within its anchor"):
        s.move_stitch([0, 1, 1, 2], "back", [0, 2])
    assert s.plan.to_json() == before


# --- through the app's API -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launched(zoo, tmp_path):
    """The app on the tiny zoo, served on a free local port: (the Blocks, the port)."""
    from composer.ui import build_app, launch
    models, specs, data = zoo
    config = AppConfig(runs_root=tmp_path / "runs", exports_dir=tmp_path / "exports", data_roots=[data],
                       model_roots=[models], eval_limit=12)
    demo = build_app(config)
    port = _free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    return demo, port


@pytest.mark.slow
def test_the_api_sets_two_way_and_adds_routes(zoo, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    demo, port = _launched(zoo, tmp_path)
    models, specs, data = zoo
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert "/set_two_way" in named and "/add_route" in named
        key = client.predict(api_name="/new_session")
        out = client.predict(key, ", ".join(specs), api_name="/custom_family")
        assert "⚠" not in out[-1], out[-1]
        out = client.predict(key, True, api_name="/set_two_way")             # three anchors: refused
        assert "⚠" in out[-1] and "exactly two anchors" in out[-1] and out[-2] is False
        client.predict(key, specs[:2], api_name="/set_anchors")
        out = client.predict(key, True, api_name="/set_two_way")
        graph, count, two_way, status = out[0], out[1], out[-2], out[-1]
        assert "⚠" not in status and two_way is True and graph["two_way"] and "14 stitches" in count
        graph = client.predict(key, [[0, 0], [1, 2], [1, 3], [0, 3]], api_name="/add_route")
        assert not graph["error"] and "added" in graph["message"]
        assert [1, 3, 0, 3] in [e["point"] for e in graph["edges"]]
        graph = client.predict(key, [[0, 0], [1, 2], [1, 3]], api_name="/add_route")
        assert graph["error"] and "also click where it comes back" in graph["message"]
        restored = client.predict(key, api_name="/restore")
        assert restored[-2] is True and restored[4]["two_way"]                # a reload shows the two-way plan
    finally:
        demo.close()


# --- fitting, reopening and exporting a two-way run --------------------------------------------------------

@pytest.mark.slow
def test_fit_reopen_and_export_a_route_added_by_hand(zoo, tmp_path):
    models, specs, data = zoo
    s = _two_way(zoo, tmp_path)
    s.add_route([[0, 0], [1, 2], [1, 3], [0, 3]])
    sid = len(s.plan.stitches) - 1
    r2 = s.fit(str(data), calib=12, eval_images=12)
    assert set(s.top1) == set(range(len(s.plan.stitches))) and set(r2) >= {sid}
    assert s.plan.stitches[sid].route == (Segment(0, 0, 0), Segment(1, 2, 3), Segment(0, 3, 3))
    saved = json.loads((s.run_dir / "plan.json").read_text())
    assert saved["options"] == {"two_way": True, "custom_routes": True}
    # a short fine-tune of the two-way run, evaluated as it goes, and its curve with the original line
    from composer.train import TrainConfig
    job = s.start_training(2, TrainConfig(batch_size=4, eval_every=1, eval_limit=6, distill="off"), str(data))
    job._thread.join(180)
    snap = s.training_snapshot()
    assert snap["state"] == "done" and snap["step"] == 2, snap
    assert f"of {len(s.plan.stitches) - 2} stitches within 1 point of the original line" in snap["judged"]
    fig = s.curve_figure()
    assert any(t.name.startswith("original anchors") for t in fig.data)
    assert sorted(i for t in fig.data if t.name in ("stitches", "anchors") for i in t.customdata) == \
        list(range(len(s.plan.stitches)))
    # a plan edit starts a new plan beside the run; reopening the run restores the two-way plan as it was
    s.set_two_way(False)
    s.open_run("run-1")
    assert s.two_way and s.routes is not None and s.plan.stitches[sid].route[1] == Segment(1, 2, 3)
    s.add_route([[1, 0], [0, 2]])          # edits continue from the reopened routes
    assert len(s.plan.stitches) == sid + 2
    s.open_run("run-1")
    zip_path = s.export("stitch", sid)
    assert zip_path.is_file()
    import zipfile
    with zipfile.ZipFile(zip_path) as z:
        config = json.loads(z.read(f"{zip_path.stem}/config.json"))
    assert [seg["anchor"] for seg in config["route"]] == [0, 1, 0]


# --- in a real browser: the drawing and the clicks (Chromium, as tests/test_browser.py) --------------------

@pytest.mark.browser
@pytest.mark.slow
def test_browser_draws_both_directions_and_adds_routes_by_clicks(zoo, tmp_path):
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip(f"no Chromium at {chromium} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    demo, port = _launched(zoo, tmp_path)
    models, specs, data = zoo
    # the session is prepared on the server, and the page opens it (?session=): no starter family needed
    s = demo.store.new()
    s.custom_family(", ".join(specs[:2]))
    s.choose_family("custom")
    s.set_two_way(True)
    artifacts = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        with sync_api.sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium, headless=True, viewport={"width": 1400, "height": 1000},
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
            page = ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/?session={s.key}")
            page.wait_for_selector("#zc-graph .zc-edge-back", timeout=60_000)
            # links both ways: 3 dashed large -> small, 3 solid small -> large, each with its arrowhead
            assert page.locator("#zc-graph .zc-edge-back").count() == 3
            assert page.locator("#zc-graph .zc-edge").count() == SNNETV2_LINKS
            assert page.locator("#zc-graph .zc-arrow").count() == SNNETV2_LINKS
            assert page.locator("#zc-two-way input").is_checked()
            unit = lambda a, u: page.locator(f'#zc-graph .zc-unit[data-anchor="{a}"][data-part="{u}"]')  # noqa: E731
            msg = lambda: page.locator("#zc-graph .zc-graph-msg").inner_text()  # noqa: E731

            # there and back: four clicks (leave small, enter large, leave large, back to small) add it
            unit(0, 0).click()
            unit(1, 2).click()
            assert "head to end there" in msg()
            unit(1, 3).click()
            assert "comes back" in msg()
            page.locator("#zc-graph").screenshot(path=str(artifacts / "two-way-1-clicking.png"))
            unit(0, 3).click()
            page.wait_for_selector('#zc-graph .zc-edge-back[data-point="1,3,0,3"]')
            assert "added" in msg() and s.plan.stitches[-1].route == (Segment(0, 0, 0), Segment(1, 2, 3), Segment(0, 3, 3))
            # one link large -> small: two clicks, then the small anchor's head ends the route there
            unit(1, 0).click()
            unit(0, 2).click()
            page.locator('#zc-graph .zc-end[data-anchor="0"][data-part="head"]').click()
            page.wait_for_selector('#zc-graph .zc-edge-back[data-point="1,0,0,2"]')
            assert s.plan.stitches[-1].route == (Segment(1, 0, 0), Segment(0, 2, 3))
            # a click that cannot continue the route says so at once, and nothing is sent
            n = len(s.plan.stitches)
            unit(0, 1).click()
            unit(0, 2).click()
            assert "enters the other anchor" in msg() and page.locator("#zc-graph .zc-graph-msg.zc-error").count() == 1
            page.keyboard.press("Escape")
            # a route Python refuses (it leaves the large anchor before it entered it) comes back as the reason
            unit(0, 0).click()
            unit(1, 3).click()
            unit(1, 2).click()
            unit(0, 3).click()
            page.wait_for_function("document.querySelector('#zc-graph .zc-graph-msg').textContent.includes('or later')")
            assert len(s.plan.stitches) == n
            # the there-and-back route, selected: its two links highlighted and numbered in route order
            s.select(n - 2)
            page.reload()
            page.wait_for_selector("#zc-graph .zc-route-step")
            steps = page.locator("#zc-graph .zc-edge.zc-on-route")
            assert steps.count() == 2
            order = page.evaluate("""() => [...document.querySelectorAll('#zc-graph .zc-edge.zc-on-route')]
                .map(e => [e.dataset.point, e.querySelector('.zc-route-step text').textContent])""")
            assert sorted(order, key=lambda x: x[1]) == [["0,0,1,2", "1"], ["1,3,0,3", "2"]]
            page.locator("#zc-graph").screenshot(path=str(artifacts / "two-way-2-route.png"))
            assert not errors, errors
            ctx.close()
    finally:
        demo.close()

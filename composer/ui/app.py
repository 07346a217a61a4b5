"""The Gradio app: widgets and events only; every action is a `Session` method (composer/ui/session.py).

`build_app` lays out the page; one function per section of it (`family_section`, `plan_section`,
... `builders_section`, in page order below) makes that section's widgets and wires their events,
and `Page` carries what the sections share (the session key, the status line, the graph, the curve).

Each event has an explicit api_name, so the whole flow is scriptable with gradio_client (see
docs/app_api.md). The first input of every endpoint is the session key from /new_session.
Bad input never raises out of a handler: it comes back as a message (on the graph for graph
edits, in the status line otherwise), and a running fine-tune is never touched by it.
"""
from __future__ import annotations

import html
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from composer.checks import number, whole
from composer.errors import UserError
from composer.ui import views
from composer.ui.session import DEFAULT_OPTIONS, AppConfig, AppError, Session, SessionStore

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
AXES = [("MACs", "macs"), ("params", "params"), ("activations", "activations"), ("latency (measure first)", "latency")]
DISTILL = [("family default", "default"), ("none", "none"),
           ("largest anchor", "largest"), ("each route's own anchor", "anchors")]
# the form's choice -> composer.train.TrainConfig.distill (None: the family default, resolved by the trainer)
DISTILL_CONFIG = {"default": None, "none": "off", "off": "off", "largest": "largest", "anchors": "anchors"}
SAMPLING = [("family default", "default"), ("uniform (SN-Net)", "uniform"), ("grouped by MACs", "macs_grouped"),
            ("by need (stitches furthest below the line)", "need")]


def plotly_js() -> Path:
    import plotly
    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def default_config(runs_root: Path | None = None, data_roots: list[Path] | None = None,
                   model_roots: list[Path] | None = None, starter_cache: Path | None = None) -> AppConfig:
    from zoo.starter import default_cache_dir
    cache = default_cache_dir()
    return AppConfig(runs_root=Path(runs_root or cache / "app-runs").expanduser(),
                     exports_dir=Path(tempfile.mkdtemp(prefix="zoo-composer-exports-")),
                     data_roots=[Path(p).expanduser() for p in (data_roots if data_roots is not None else [cache / "data"])],
                     model_roots=[Path(p).expanduser() for p in (model_roots if model_roots is not None else [cache / "models"])],
                     starter_cache=starter_cache)


def _message(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    log.exception("unexpected error in a UI handler")
    return f"internal error ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the app is still running"


def _status(text: str, error: bool = False) -> str:
    return (f"<span style='color:#a8201a;font-weight:600'>⚠ {html.escape(text, quote=False)}</span>" if error
            else html.escape(text, quote=False))


# --- what the sections share -------------------------------------------------------------------

@dataclass
class Page:
    """The sessions, and the widgets that more than one section updates. The widgets are made
    before the sections (render=False) and placed by the section that shows them (.render()), so
    a section on the left can update the graph and the curve on the right."""
    store: SessionStore
    config: AppConfig
    session: gr.Textbox      # hidden: the session key, the first input of every event
    status: gr.HTML          # one line about the latest action: what happened, or ⚠ why not and what to do
    count: gr.Markdown       # 2 · how many stitches the plan has
    graph: gr.HTML           # the block graphs
    axis: gr.Radio           # 5 · the curve's x axis
    curve: gr.HTML
    budget: gr.Slider
    picked: gr.Markdown      # the selected stitch
    candidate: gr.Textbox    # 6 · an elastic / shrink candidate to export ("METHOD:NAME")
    anchors: gr.CheckboxGroup   # 1 · the members stitched
    kernel: gr.Number        # 2 · the plan's options, always as the plan uses them
    stride: gr.Number
    all_pairs: gr.Checkbox
    two_way: gr.Checkbox     # 2 · SN-Netv2's routes between two anchors instead of SN-Net's
    runs: gr.Dropdown        # 3 · earlier runs of this session (choose one to reopen it)
    progress: gr.HTML        # 4 · the fine-tune of the run shown
    download: gr.File        # 6 · the zips this session exported

    def session_of(self, key: str) -> Session:
        return self.store.get(key)

    @property
    def plan_outputs(self) -> list:
        """What a plan edit redraws (see `plan_views`)."""
        return [self.graph, self.count, self.curve, self.budget, self.picked, self.kernel, self.stride,
                self.all_pairs, self.anchors, self.runs, self.progress, self.two_way, self.status]

    @property
    def selection_outputs(self) -> list:
        """What a new selection redraws (see `selected_views`)."""
        return [self.graph, self.curve, self.picked, self.status]


def make_page(store: SessionStore, config: AppConfig, session: gr.Textbox, status: gr.HTML) -> Page:
    head_plotly = f'<script src="gradio_api/file={plotly_js()}"></script>'
    return Page(
        store, config, session, status,
        count=gr.Markdown(views.plan_count_md(None), render=False),
        graph=gr.HTML(views.graph_value(None), html_template='<div class="zc-graph-root"></div>',
                      js_on_load=(ASSETS / "graph.js").read_text(), elem_id="zc-graph", render=False),
        axis=gr.Radio(AXES, value="macs", label="x axis", scale=3, render=False),
        curve=gr.HTML({"message": "The curve appears after fitting (step 3)."},
                      html_template='<div class="zc-curve"><div class="zc-curve-empty"></div>'
                                    '<div class="zc-curve-plot"></div></div>',
                      js_on_load=(ASSETS / "curve.js").read_text(), head=head_plotly, elem_id="zc-curve",
                      render=False),
        budget=gr.Slider(0, 1, value=1, label="budget (fit first)", interactive=False, render=False),
        picked=gr.Markdown(views.stitch_md(None), render=False),
        candidate=gr.Textbox(label="elastic / shrink candidate (click its point on the curve)",
                             placeholder="METHOD:NAME", scale=3, render=False),
        anchors=gr.CheckboxGroup(label="anchors to stitch (at least two)", choices=[], render=False),
        # precision=None everywhere: a typed 2.5 reaches the checks (and is refused), never rounded on the way
        kernel=gr.Number(value=DEFAULT_OPTIONS["kernel"], label="kernel", min_width=80, render=False),
        stride=gr.Number(value=DEFAULT_OPTIONS["stride"], label="stride", min_width=80, render=False),
        all_pairs=gr.Checkbox(value=DEFAULT_OPTIONS["all_pairs"], label="all pairs (not only neighbours)", render=False),
        two_way=gr.Checkbox(value=False, label="two-way (SN-Netv2): both ways and there and back, two anchors",
                            render=False, elem_id="zc-two-way"),
        runs=gr.Dropdown(label="earlier runs of this session (choose one to reopen it)", choices=[], value=None,
                         interactive=True, render=False, elem_id="zc-runs"),
        progress=gr.HTML(views.progress_html(None), js_on_load=None, render=False, elem_id="zc-progress"),
        download=gr.File(label="exported files", interactive=False, file_count="multiple", render=False))


# --- view helpers: what each widget shows for a session ----------------------------------------

def graph_view(s: Session, message: str | None = None, error: bool = False) -> dict:
    if message is not None:
        s.message, s.error = message, error
    return views.graph_value(s.plan, s.r2, s.selected, s.message, s.error, fitted=bool(s.r2))


def curve_view(s: Session, x: str = "macs") -> dict:
    try:
        fig = s.curve_figure(x)
    except UserError as e:
        return {"message": str(e)}
    if fig is None:
        if s.plan is not None and s.run_dir is None and s.runs():
            return {"message": "The curve appears after fitting (step 3): one point per stitch. Earlier runs of "
                               "this session can be reopened there too."}
        return {"message": "The curve appears after fitting (step 3): one point per stitch."}
    return json.loads(fig.to_json())


def budget_view(s: Session, x: str):
    from composer.curve import curve_points
    try:
        pts = curve_points(s.plan, s.top1, x, s.latency) if (s.plan and s.top1) else []
    except UserError:
        pts = []
    if not pts:
        return gr.Slider(minimum=0, maximum=1, value=1, interactive=False, label="budget (fit first)")
    lo, hi = min(p.x for p in pts), max(p.x for p in pts)
    unit = "ms" if x == "latency" else "M"
    return gr.Slider(minimum=round(lo, 4), maximum=round(hi, 4) if hi > lo else round(lo, 4) + 1, value=round(hi, 4),
                     interactive=True, label=f"budget ({dict((v, k) for k, v in AXES)[x]} in {unit}): best stitch under it")


def selection_view(s: Session) -> str:
    return views.stitch_md(s.stitch_summary(s.selected))


def members_table(s: Session):
    rows = s.members()
    return [[r["name"], round(r["params_m"], 3), round(r["macs_m"], 3), r["resolution"], r["blocks"], r["pretrained"]]
            for r in rows]


def anchor_choices(s: Session):
    rows = s.members()
    return gr.CheckboxGroup(choices=[(f"{r['name']} ({r['macs_m']:.3g} M MACs)", r["spec"]) for r in rows],
                            value=list(s.specs), interactive=bool(rows))


def family_choices(s: Session):
    return gr.Dropdown(choices=[(e.label(), e.id) for e in s.families.values()],
                       value=s.family.id if s.family else None)


def family_md(s: Session) -> str:
    if s.family is None:
        return "No family chosen yet. The **starter** family works offline (tiny ViTs on digits)."
    return f"**{s.family.name}** · {s.family.source} · pretrained on: {s.family.tag or 'unknown'}" + (
        f" · {s.family.note}" if s.family.note else "")


def plan_form(s: Session) -> list:
    """The plan option boxes as the plan uses them (after a refusal or a reset too)."""
    return [s.options["kernel"], s.options["stride"], s.options["all_pairs"]]


def runs_view(s: Session):
    return gr.Dropdown(choices=s.runs(), value=s.run_dir.name if s.run_dir is not None else None)


def progress_view(s: Session) -> str:
    return views.progress_html(s.training_snapshot())


def timer_view(s: Session):
    return gr.Timer(active=bool(s.job and s.job.running))


def exports_view(s: Session):
    return [str(p) for p in sorted(s.exports)] or None


def train_form(s: Session, config: AppConfig) -> list:
    """The fine-tune form as last started in this session (the defaults before that)."""
    f = {"steps": 100, "lr": 0, "batch": 0, "sampling": "default", "distill": "default", "eval_every": 25,
         **s.train_form}
    return [f["steps"], f["lr"], f["batch"], f["sampling"], f["distill"], f["eval_every"]]


def plan_views(s: Session, text: str, refused: bool = False) -> list:
    """Values for Page.plan_outputs after a plan change, or after a refused one (the graph says why;
    the option boxes and anchor ticks go back to what the plan uses)."""
    if refused:
        return ([graph_view(s, text, True)] + [gr.skip()] * 4 + plan_form(s) + [anchor_choices(s)]
                + [gr.skip()] * 2 + [s.two_way, _status(text, True)])
    return [graph_view(s, text), views.plan_count_md(s.plan), curve_view(s), budget_view(s, "macs"),
            selection_view(s), *plan_form(s), anchor_choices(s), runs_view(s), progress_view(s), s.two_way,
            _status(text)]


def selected_views(s: Session, x: str, text: str = "") -> list:
    """Values for Page.selection_outputs after a new selection."""
    return [graph_view(s), curve_view(s, x), selection_view(s), _status(text)]


def select_stitch(page: Page, key: str, stitch_id, x: str) -> list:
    """Select a stitch by id -> values for Page.selection_outputs."""
    try:
        s = page.session_of(key)
        s.select(stitch_id)
        return selected_views(s, x, f"selected stitch {s.selected}: export it in section 6")
    except Exception as e:
        return [gr.skip()] * 3 + [_status(_message(e), True)]


def plan_action(page: Page, method):
    """A plan edit: session method + arguments -> redrawn plan views, or the reason on the graph."""
    def handler(key, *args):
        s = page.store.find(key)
        try:
            if s is None:
                page.session_of(key)
            method(s, *args)
            return plan_views(s, s.message)
        except Exception as e:
            msg = _message(e)
            if s is None:
                return [gr.skip()] * (len(page.plan_outputs) - 1) + [_status(msg, True)]
            return plan_views(s, msg, refused=True)
    return handler


# --- the page ------------------------------------------------------------------------------------

def build_app(config: AppConfig | None = None) -> gr.Blocks:
    """The page: a title, a status line, two columns of numbered sections. Each section function
    below makes its widgets and wires their events; `Page` carries what they share."""
    config = config or default_config()
    store = SessionStore(config)
    gr.set_static_paths([str(plotly_js())])
    with gr.Blocks(title="Zoo Composer", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        session = gr.Textbox(visible=False, label="session")
        from composer.pipeline import device_name, resolve_where
        where, precision = resolve_where("auto", "auto")   # what the app's jobs run on (the pipeline's default)
        gr.Markdown("## Zoo Composer · stitch a model family into a speed/accuracy curve (SN-Net)\n\n"
                    f"Jobs run on {device_name(where)} in {precision}.", elem_id="zc-device")
        status = gr.HTML("", elem_id="zc-status", elem_classes="zc-status", js_on_load=None)
        page = make_page(store, config, session, status)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=400):
                family = family_section(page)                  # 1
                plan_section(page)                             # 2
                data = fit_section(page)                       # 3
                train_widgets = finetune_section(page, data)   # 4
            with gr.Column(scale=3, min_width=560):
                graph_section(page)
                curve_section(page)                            # 5
                export_section(page)                           # 6
                builders_section(page)                         # 7
        script_endpoints(page)
        outputs = everything(page, family, train_widgets, data)
        family_events(page, family, outputs)
        fit_events(page, data, outputs)
        session_events(page, demo, outputs)
    demo.store = store          # tests and the benchmark look sessions up
    demo.zc_config = config
    return demo


@dataclass
class TrainWidgets:
    timer: gr.Timer
    form: list               # steps to add, learning rate, batch, sampling, distillation, evaluate every


def everything(page: Page, family: "FamilyWidgets", train: TrainWidgets, data: gr.Dropdown) -> list:
    """Every widget that shows the session's state, in the order of `everything_views` (and of the
    outputs of /restore, /choose_family, /custom_family, /open_run, /open_starter), the status last."""
    return [family.family, family.info, family.members, page.anchors, page.graph, page.count, page.curve,
            page.budget, page.picked, page.progress, train.timer, data, family.hub_line, page.kernel, page.stride,
            page.all_pairs, page.runs, page.download, *train.form, page.two_way, page.status]


def everything_views(s: Session, page: Page, status: str, error: bool = False, graph_message: str | None = None,
                     hub_line=None, form: bool = True) -> list:
    """Values for `everything`: the session as the server holds it (after a reload too)."""
    return [family_choices(s), family_md(s), members_table(s), anchor_choices(s),
            graph_view(s, graph_message, error) if graph_message is not None else graph_view(s),
            views.plan_count_md(s.plan), curve_view(s), budget_view(s, "macs"), selection_view(s),
            progress_view(s), timer_view(s), gr.Dropdown(choices=s.data_choices(), value=s.data or "starter"),
            gr.skip() if hub_line is None else hub_line, *plan_form(s), runs_view(s), exports_view(s),
            *(train_form(s, page.config) if form else [gr.skip()] * 6), s.two_way, _status(status, error)]


def session_events(page: Page, demo: gr.Blocks, outputs: list) -> None:
    """On load: a new session (or the one named in ?session=), everything it shows (`outputs`, see
    `everything`), then the starter family when no family is chosen yet (built with visible
    progress on first use)."""

    def restore(key: str):
        """Everything a tab shows for a session (used on load, also after a reload)."""
        try:
            s = page.session_of(key)
        except AppError as e:
            return [gr.skip()] * (len(outputs) - 1) + [_status(str(e), True)]
        entries, line = s.list_families("")
        if s.job is not None and s.job.running:
            text = f"reattached to the running fine-tune of {s.run_dir.name if s.run_dir else 'this session'}"
        elif s.family is None:
            text = ("opening the starter family: three tiny ViTs on digits (its first use trains them: about a "
                    "minute, with progress here)")
        else:
            text = f"{s.family.name}: {len(s.plan.stitches) if s.plan else 0} stitches" + (
                f"; showing {s.run_dir.name} ({s._run_state(s.run_dir)})" if s.run_dir else "")
        graph_message = None if s.family is not None else text   # the same words on the graph and the status
        return everything_views(s, page, text, graph_message=graph_message, hub_line=line)

    def new_session(request: gr.Request | None = None) -> str:
        key = None
        if request is not None:
            key = request.query_params.get("session")
        return key if page.store.find(key) is not None else page.store.new().key

    def open_starter(key: str, prog=gr.Progress(track_tqdm=True)):
        """The starter family, unless the session already shows one (what the page opens on)."""
        s = page.store.find(key)
        if s is None:
            return [gr.skip()] * len(outputs)
        if s.family is not None:
            return [gr.skip()] * len(outputs)
        try:
            s.choose_family("starter", progress=lambda f, t: prog(f, desc=t))
        except Exception as e:
            msg = _message(e)
            return everything_views(s, page, f"the starter family could not be opened: {msg}", True, msg, form=False)
        return everything_views(s, page, f"{s.family.name}: {len(s.specs)} anchors, {len(s.plan.stitches)} stitches. "
                                "Click a block, then a block of a larger anchor, to add a stitch; or fit (step 3)",
                                form=False)

    demo.load(new_session, outputs=page.session, api_name="new_session").then(
        restore, inputs=page.session, outputs=outputs, api_name="restore").then(
        None, inputs=page.session, js="(k) => { const u = new URL(window.location); "
                                      "if (k && u.searchParams.get('session') !== k) { u.searchParams.set('session', k); "
                                      "window.history.replaceState(null, '', u); } }").then(
        open_starter, inputs=page.session, outputs=outputs, api_name="open_starter",
        concurrency_id="compute", concurrency_limit=2, show_progress_on=[page.status])


# --- 1 · family ------------------------------------------------------------------------------------

@dataclass
class FamilyWidgets:
    family: gr.Dropdown
    info: gr.Markdown
    members: gr.Dataframe
    hub_line: gr.Markdown
    custom: gr.Textbox
    custom_go: gr.Button


def family_section(page: Page) -> FamilyWidgets:
    """Search the Hub, choose a family (or custom anchors), its members, the anchors to stitch."""
    with gr.Group():
        gr.Markdown("### 1 · Family")
        with gr.Row():
            query = gr.Textbox(label="search the Hub", placeholder="e.g. deit", scale=3)
            search = gr.Button("Search", scale=1)
        hub_line = gr.Markdown("")
        # allow_custom_value: ids are checked by the session, so API clients need no prior listing
        family = gr.Dropdown(label="family", choices=[], interactive=True, allow_custom_value=True)
        family_info = gr.Markdown("")
        with gr.Accordion("custom anchors", open=False):
            custom = gr.Textbox(label="timm names or hf-hub:org/repo, comma separated (at least two)", lines=2)
            custom_go = gr.Button("Use these anchors")
        members = gr.Dataframe(headers=["member", "params (M)", "MACs (M)", "resolution", "blocks", "pretrained on"],
                               interactive=False, wrap=True, label="members (MACs: 1 multiply-add = 1)",
                               elem_id="zc-members", column_widths=["28%", "13%", "13%", "14%", "11%", "21%"])
        page.anchors.render()
    widgets = FamilyWidgets(family, family_info, members, hub_line, custom, custom_go)

    def list_families(key: str, text: str):
        try:
            s = page.session_of(key)
            entries, line = s.list_families(text)
            return family_choices(s), line, _status(f"{len(entries)} families: choose one in the list")
        except Exception as e:
            return gr.skip(), gr.skip(), _status(_message(e), True)

    for ev in (search.click, query.submit):
        ev(list_families, [page.session, query], [family, hub_line, page.status],
           api_name="list_families" if ev == search.click else "search_submit")

    return widgets


def family_events(page: Page, widgets: FamilyWidgets, outputs: list) -> None:
    """Choosing a family (or custom anchors) redraws everything (`outputs`, see `everything`); a
    refusal leaves the family shown as it was, and the dropdown names it again."""
    def open_family(key: str, choose) -> list:
        s = page.store.find(key)
        try:
            if s is None:
                page.session_of(key)
            choose(s)
        except Exception as e:
            msg = _message(e)
            if s is None:
                return [gr.skip()] * (len(outputs) - 1) + [_status(msg, True)]
            shown = f"; still showing {s.family.name}" if s.family else ""
            return [family_choices(s)] + [gr.skip()] * (len(outputs) - 2) + [_status(msg + shown, True)]
        return everything_views(s, page, s.message, form=False)

    def choose_family(key: str, family_id: str, prog=gr.Progress(track_tqdm=True)):
        return open_family(key, lambda s: s.choose_family(family_id, progress=lambda f, t: prog(f, desc=t)))

    def use_custom(key: str, text: str, prog=gr.Progress()):
        def choose(s):
            entry = s.custom_family(text)
            s.choose_family(entry.id, progress=lambda f, t: prog(f, desc=t))
        return open_family(key, choose)

    widgets.family.input(choose_family, [page.session, widgets.family], outputs, api_name="choose_family",
                         concurrency_id="compute", concurrency_limit=2, show_progress_on=[page.status])
    widgets.custom_go.click(use_custom, [page.session, widgets.custom], outputs, api_name="custom_family",
                    concurrency_id="compute", concurrency_limit=2, show_progress_on=[page.status])
    page.anchors.input(plan_action(page, Session.set_anchors), [page.session, page.anchors], page.plan_outputs,
                       api_name="anchors_input", api_visibility="undocumented")


# --- 2 · stitch plan -------------------------------------------------------------------------------

def plan_section(page: Page) -> None:
    """SN-Net's sliding-window options, or SN-Netv2's two-way routes; the number of stitches."""
    with gr.Group():
        gr.Markdown("### 2 · Stitch plan")
        with gr.Row():
            page.kernel.render()
            page.stride.render()
            page.all_pairs.render()
        page.two_way.render()
        with gr.Row():
            apply_opts = gr.Button("Apply options", size="sm")
            reset = gr.Button("Reset to SN-Net defaults", size="sm")
        page.count.render()

    apply_opts.click(plan_action(page, Session.set_options), [page.session, page.kernel, page.stride, page.all_pairs],
                     page.plan_outputs, api_name="set_options")
    reset.click(plan_action(page, Session.reset_plan), [page.session], page.plan_outputs, api_name="reset_plan")
    page.two_way.input(plan_action(page, Session.set_two_way), [page.session, page.two_way], page.plan_outputs,
                       api_name="set_two_way")


# --- 3 · fit -------------------------------------------------------------------------------------------

def fit_section(page: Page) -> gr.Dropdown:
    """Least squares for every stitching layer, then top-1 of every stitch; earlier runs to reopen.
    Returns the data dropdown (the fine-tune trains on it)."""
    with gr.Group():
        gr.Markdown("### 3 · Fit stitching layers")
        data = gr.Dropdown(label="calibration data (a folder under the data roots, or a data set)",
                           choices=["starter"], value="starter", allow_custom_value=True)
        with gr.Row():
            calib = gr.Number(value=256, label="calibration images")
            eval_n = gr.Number(value=page.config.eval_limit, label="evaluation images")
        fit_btn = gr.Button("Fit and evaluate", variant="primary")
        fit_status = gr.Markdown("")
        page.runs.render()

    def fit(key: str, data_spec: str, n_calib, n_eval, x: str, prog=gr.Progress()):
        s = page.store.find(key)
        try:
            if s is None:
                page.session_of(key)
            s.fit(data_spec, n_calib, n_eval, progress=lambda f, t: prog(f, desc=t))
            return [graph_view(s), curve_view(s, x), budget_view(s, x), views.stitch_md(None), runs_view(s),
                    progress_view(s), _status(s.message), s.message]
        except Exception as e:
            msg = _message(e)
            return [gr.skip()] * 6 + [_status(msg, True), _status(msg, True)]

    fit_btn.click(fit, [page.session, data, calib, eval_n, page.axis],
                  [page.graph, page.curve, page.budget, page.picked, page.runs, page.progress, page.status, fit_status],
                  api_name="fit", concurrency_id="compute", concurrency_limit=2, show_progress_on=[fit_status])
    return data


def fit_events(page: Page, data: gr.Dropdown, outputs: list) -> None:
    """Reopening an earlier run redraws everything (`outputs`, see `everything`)."""
    def open_run(key: str, name: str):
        s = page.store.find(key)
        try:
            if s is None:
                page.session_of(key)
            s.open_run(name)
            return everything_views(s, page, s.message + (": pick a stitch on the curve, fine-tune or export it"
                                                          if s.top1 else ""), form=False)
        except Exception as e:
            msg = _message(e)
            if s is None:
                return [gr.skip()] * (len(outputs) - 1) + [_status(msg, True)]
            return [gr.skip()] * 16 + [runs_view(s)] + [gr.skip()] * (len(outputs) - 18) + [_status(msg, True)]

    page.runs.input(open_run, [page.session, page.runs], outputs, api_name="open_run",
                    concurrency_id="compute", concurrency_limit=2, show_progress_on=[page.status])


# --- 4 · fine-tune -----------------------------------------------------------------------------------

def finetune_section(page: Page, data: gr.Dropdown) -> TrainWidgets:
    """Start, poll and cancel a background fine-tune of N more steps; returns its timer and form."""
    with gr.Group():
        gr.Markdown("### 4 · Fine-tune")
        with gr.Row():
            steps = gr.Number(value=100, label="steps to add", info="more steps from where the run is")
            lr = gr.Number(value=0, label="learning rate", info="0: the family default")
            batch = gr.Number(value=0, label="batch", info="0: 32 on a CPU, 64 on a GPU")
        with gr.Row():
            sampling = gr.Dropdown(SAMPLING, value="default", label="stitch sampling",
                                   info="default: by need with anchors' routes 30 % for CNNs, uniform for ViTs")
            distill = gr.Dropdown(DISTILL, value="default", label="distillation",
                                  info="default: each route's own anchor (pretrained anchors)")
            eval_every = gr.Number(value=25, label="evaluate every (steps)", info="0: only at the end")
        with gr.Row():
            train_btn = gr.Button("Start / resume", variant="primary")
            cancel_btn = gr.Button("Cancel", variant="stop")
        page.progress.render()
        timer = gr.Timer(0.5, active=False)
    form = [steps, lr, batch, sampling, distill, eval_every]

    def train_start(key: str, n_steps, rate, batch_size, sampling_kind, distill_kind, every, data_spec):
        try:
            from composer.train import TrainConfig
        except ImportError:
            return gr.skip(), gr.skip(), _status("fine-tuning is not available in this build", True)
        try:
            s = page.session_of(key)
            add = whole(n_steps, "steps to add", 1, 1_000_000)
            rate = number(rate, "learning rate (0: the family default)", 0)
            if str(distill_kind) not in DISTILL_CONFIG:
                raise AppError(f"distillation must be one of {', '.join(DISTILL_CONFIG)}, not '{str(distill_kind)[:20]}'")
            if str(sampling_kind) not in dict((v, k) for k, v in SAMPLING):
                raise AppError(f"stitch sampling must be one of {', '.join(v for _, v in SAMPLING)}, "
                               f"not '{str(sampling_kind)[:20]}'")
            cfg = TrainConfig(
                lr=rate or None, batch_size=whole(batch_size, "batch (0: the default)", 0, 4096) or None,
                sampling=None if str(sampling_kind) == "default" else str(sampling_kind),
                distill=DISTILL_CONFIG[str(distill_kind)], eval_every=whole(every, "evaluate every (steps)", 0),
                eval_limit=page.config.eval_limit, checkpoint_every=25)
            form_values = {"lr": rate, "batch": cfg.batch_size or 0, "sampling": str(sampling_kind), "distill": str(distill_kind),
                           "eval_every": cfg.eval_every}
            job = s.start_training(add, cfg, data_spec, form=form_values)
            first = job.config.steps - add
            return progress_view(s), gr.Timer(active=True), _status(
                f"fine-tune started on {s.run_dir.name}: {add} steps, step {first} → {job.config.steps}"
                + (" (resuming from its checkpoint)" if first else ""))
        except Exception as e:
            return gr.skip(), gr.skip(), _status(_message(e), True)

    train_btn.click(train_start, [page.session, *form, data], [page.progress, timer, page.status],
                    api_name="train_start")

    def train_cancel(key: str):
        try:
            s = page.session_of(key)
            stopped = s.cancel_training()
            return _status("cancelling: the fine-tune stops after this step and saves a checkpoint"
                           if stopped else "no fine-tune is running")
        except Exception as e:
            return _status(_message(e), True)

    cancel_btn.click(train_cancel, [page.session], [page.status], api_name="train_cancel")

    def train_poll(key: str, x: str):
        """Progress of this session's fine-tune; the curve only when a new evaluation arrived (or the
        job ended); the status line once, when the job has ended."""
        s = page.store.find(key)
        if s is None or s.job is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False), gr.skip()
        job = s.job
        snap = job.snapshot()
        running = job.running
        seen = (snap["evals"], running)
        new_curve = seen != getattr(s, "_shown_evals", None)
        s._shown_evals = seen
        ended = gr.skip()
        if not running and getattr(s, "_reported_job", None) is not job:
            s._reported_job = job   # said once: the status line is about the latest action
            state = snap.get("state")
            ended = _status(f"fine-tune {state}: {snap.get('message')}", state in ("error", "diverged"))
        return (views.progress_html(snap), curve_view(s, x) if new_curve else gr.skip(),
                budget_view(s, x) if new_curve else gr.skip(), gr.Timer(active=running), ended)

    timer.tick(train_poll, [page.session, page.axis], [page.progress, page.curve, page.budget, timer, page.status],
               api_name="train_poll", show_progress="hidden")
    return TrainWidgets(timer, form)


# --- the block graphs ----------------------------------------------------------------------------------

def graph_section(page: Page) -> None:
    """The anchors' blocks and the stitches between them, edited with the mouse (scripts: `script_endpoints`)."""
    gr.Markdown("### Block graphs · click a block, then a block of a larger anchor, to add a stitch; "
                "drag an edge end to move it. Two-way: click where a route leaves an anchor and enters the "
                "other, then the head to end there, or where it leaves and comes back")
    page.graph.render()

    # Graph edits from the browser arrive as custom events with their data on gr.EventData.
    def from_event(method, *fields):
        act = plan_action(page, method)

        def handler(key: str, evt: gr.EventData):
            return act(key, *(getattr(evt, f, None) for f in fields))
        return handler

    page.graph.stitch_add(from_event(Session.add_stitch, "front", "back"), [page.session], page.plan_outputs,
                          api_name="graph_stitch_add", api_visibility="undocumented")
    page.graph.stitch_move(from_event(Session.move_stitch, "point", "end", "to"), [page.session], page.plan_outputs,
                           api_name="graph_stitch_move", api_visibility="undocumented")
    page.graph.stitch_remove(from_event(Session.remove_stitch, "point"), [page.session], page.plan_outputs,
                             api_name="graph_stitch_remove", api_visibility="undocumented")
    page.graph.route_add(from_event(Session.add_route, "points"), [page.session], page.plan_outputs,
                         api_name="graph_route_add", api_visibility="undocumented")


# --- endpoints for scripts only (no visible widget) ------------------------------------------------

def script_endpoints(page: Page) -> None:
    """The graph edits with plain arguments (the graph JSON back), and selecting a stitch by id."""
    def api_graph(method, *args) -> dict:
        key, rest = args[0], args[1:]
        s = page.store.find(key)
        try:
            if s is None:
                page.session_of(key)
            method(s, *rest)
            return graph_view(s)
        except Exception as e:
            if s is None:
                return {"anchors": [], "edges": [], "message": _message(e), "error": True}
            return graph_view(s, _message(e), True)

    def add_stitch(session: str, front_anchor: int, front_block: int, back_anchor: int, back_block: int) -> dict:
        """Add the stitch front_anchor[0..front_block] -> back_anchor[back_block..]; returns the graph
        (its "error"/"message" say why when refused)."""
        return api_graph(Session.add_stitch, session, (front_anchor, front_block), (back_anchor, back_block))

    def move_stitch(session: str, point: list[int], end: str, to: list[int]) -> dict:
        """Move the "front" or "back" end of the stitch [f, j, b, k] to block `to` = [anchor, block]."""
        return api_graph(Session.move_stitch, session, point, end, to)

    def remove_stitch(session: str, point: list[int]) -> dict:
        """Remove the stitch [f, j, b, k] (in a two-way plan: that link and every route through it)."""
        return api_graph(Session.remove_stitch, session, point)

    def add_route(session: str, points: list[list[int]]) -> dict:
        """Add the route through these [anchor, block]s: where it leaves an anchor and enters the other
        (2), and where it leaves that one and comes back (4, two-way plans only); returns the graph."""
        return api_graph(Session.add_route, session, points)

    def set_anchors(session: str, specs: list[str]) -> dict:
        """Stitch only these members of the chosen family (specs as listed by /choose_family)."""
        return api_graph(Session.set_anchors, session, specs)

    gr.api(set_anchors, api_name="set_anchors")
    gr.api(add_stitch, api_name="add_stitch")
    gr.api(move_stitch, api_name="move_stitch")
    gr.api(remove_stitch, api_name="remove_stitch")
    gr.api(add_route, api_name="add_route")

    def select_by_id(key: str, stitch_id, x: str):
        return select_stitch(page, key, stitch_id, x)

    select_box = gr.Number(visible=False)
    select_box.change(select_by_id, [page.session, select_box, page.axis], page.selection_outputs,
                      api_name="select_stitch")


# --- 5 · curve and selection ---------------------------------------------------------------------------

def curve_section(page: Page) -> None:
    """The speed/accuracy curve: pick a stitch by its point, by id or under a budget; the x axis; latency."""
    gr.Markdown("### 5 · Curve · click a point to pick a stitch")
    with gr.Row():
        page.axis.render()
        latency_btn = gr.Button("Measure latency", size="sm", scale=1)
    page.curve.render()
    page.budget.render()
    page.picked.render()

    def point_click(key: str, x: str, evt: gr.EventData):
        point = getattr(evt, "id", None)
        if isinstance(point, str) and ":" in point:   # another builder's candidate: describe it, select nothing
            try:   # and name it in the download section, ready to export
                return [gr.skip()] * 2 + [views.md_safe(page.session_of(key).candidate_md(point)),
                                          _status(f"{point}: export it with 'Export candidate' (section 6)"), point]
            except Exception as e:
                return [gr.skip()] * 3 + [_status(_message(e), True), gr.skip()]
        return select_stitch(page, key, point, x) + [gr.skip()]

    page.curve.point_click(point_click, [page.session, page.axis], page.selection_outputs + [page.candidate],
                           api_name="curve_point_click", api_visibility="undocumented")

    def set_axis(key: str, x: str):
        try:
            s = page.session_of(key)
            return curve_view(s, x), budget_view(s, x), _status("")
        except Exception as e:
            return gr.skip(), gr.skip(), _status(_message(e), True)

    page.axis.input(set_axis, [page.session, page.axis], [page.curve, page.budget, page.status], api_name="set_axis")

    def pick_under_budget(key: str, x: str, value: float):
        try:
            s = page.session_of(key)
            s.pick_under_budget(x, value)
            return selected_views(s, x, f"best stitch within the budget: {s.selected}")
        except Exception as e:
            return [gr.skip()] * 3 + [_status(_message(e), True)]

    page.budget.release(pick_under_budget, [page.session, page.axis, page.budget], page.selection_outputs,
                        api_name="pick_under_budget")

    def measure_latency(key: str, prog=gr.Progress()):
        try:
            s = page.session_of(key)
            s.measure_latency(progress=lambda f, t: prog(f, desc=t))
            return curve_view(s, "latency"), budget_view(s, "latency"), "latency", _status(
                f"latency of {len(s.latency)} stitches measured (batch 1, {os.cpu_count()} cores shared)")
        except Exception as e:
            return gr.skip(), gr.skip(), gr.skip(), _status(_message(e), True)

    latency_btn.click(measure_latency, [page.session], [page.curve, page.budget, page.axis, page.status],
                      api_name="measure_latency", concurrency_id="compute", concurrency_limit=2,
                      show_progress_on=[page.status])


# --- 6 · download ----------------------------------------------------------------------------------------

def export_section(page: Page) -> None:
    """Zips of the selected stitch, of the whole SN-Net, or of another builder's candidate."""
    gr.Markdown("### 6 · Download")
    with gr.Row():
        export_stitch_btn = gr.Button("Export selected stitch (zip)")
        export_snnet_btn = gr.Button("Export whole SN-Net (zip)")
    with gr.Row():
        page.candidate.render()
        export_candidate_btn = gr.Button("Export candidate (zip)", scale=1)
    page.download.render()
    download = page.download

    def export(what: str):
        def handler(key: str, candidate: str | None = None):
            try:
                s = page.session_of(key)
                path = s.export(what, candidate=candidate)
                return exports_view(s), _status(f"exported {path.name}: download it below")
            except Exception as e:
                return gr.skip(), _status(_message(e), True)
        return handler

    compute = dict(concurrency_id="compute", concurrency_limit=2, show_progress_on=[page.status])
    export_stitch_btn.click(export("stitch"), [page.session], [download, page.status], api_name="export_stitch",
                            **compute)
    export_snnet_btn.click(export("snnet"), [page.session], [download, page.status], api_name="export_snnet",
                           **compute)
    export_candidate_btn.click(export("candidate"), [page.session, page.candidate], [download, page.status],
                               api_name="export_candidate", **compute)


# --- 7 · the other curve builders ----------------------------------------------------------------------

def builders_section(page: Page) -> None:
    """Elastic (OFA), shrink (DMS) and fold as background jobs from an anchor or a stitch; the Scale tab."""
    gr.Markdown("### 7 · More points from other methods · they join the curve above")
    with gr.Row():
        builder_anchor = gr.Dropdown(label="from (an anchor, or a stitch: elastic, shrink and fold)", choices=[],
                                     interactive=True, scale=2, allow_custom_value=True)
        cancel = gr.Button("Cancel", variant="stop", size="sm", scale=1)
    line = gr.Markdown("")
    result = gr.Markdown("", render=False)   # placed below the tabs; the Scale tab writes to it too
    starts, shrink_plot = builder_tabs(page, builder_anchor, result)
    result.render()
    timer = gr.Timer(0.5, active=False)

    def start_builder(kind: str, *names):
        def handler(key: str, source, *values):
            try:
                s = page.session_of(key)
                s.start_builder(kind, source, **dict(zip(names, values)))
                return gr.Timer(active=True), views.md_safe(views.builder_md(s.builder.snapshot())), _status(f"{kind} started")
            except Exception as e:
                return gr.skip(), gr.skip(), _status(_message(e), True)
        return handler

    for button, kind, inputs, names in starts:
        button.click(start_builder(kind, *names), [page.session, builder_anchor, *inputs], [timer, line, page.status],
                     api_name=f"{kind}_start")

    def builder_poll(key: str, x: str):
        s = page.store.find(key)
        if s is None or s.builder is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        snap = s.builder.snapshot()
        running = s.builder.running
        plot = views.shrink_figure(snap) if s.builder.kind == "shrink" else gr.skip()
        return (views.md_safe(views.builder_md(snap)), views.md_safe(s.builder_result), plot, curve_view(s, x) if not running else gr.skip(),
                gr.Timer(active=running))

    timer.tick(builder_poll, [page.session, page.axis], [line, result, shrink_plot, page.curve, timer],
               api_name="builder_poll", show_progress="hidden")

    def builder_cancel_click(key: str):
        try:
            cancelled = page.session_of(key).cancel_builder()
            return _status("cancelling (the search stops at its next step)" if cancelled else "nothing to cancel")
        except Exception as e:
            return _status(_message(e), True)

    cancel.click(builder_cancel_click, [page.session], [page.status], api_name="builder_cancel")

    def builder_anchors(key: str, current):
        s = page.store.find(key)
        if s is None or s.plan is None:
            return gr.Dropdown(choices=[], value=None)
        choices = [(f"{_short_spec(spec)} ({info.total.macs / 1e6:.3g} M MACs)", i)
                   for i, (spec, info) in enumerate(zip(s.plan.anchors, s.plan.infos))]
        choices += [(f"stitch {st.id}: {s.plan.describe_route(st)} ({s.plan.cost(st).macs / 1e6:.3g} M MACs)",
                     f"stitch {st.id}") for st in s.plan.stitches if not st.is_anchor]
        keep = current in [v for _, v in choices]   # the curve changes often: keep the choice
        return gr.Dropdown(choices=choices, value=current if keep else len(s.plan.anchors) - 1)

    page.curve.change(builder_anchors, [page.session, builder_anchor], [builder_anchor], api_name="builder_anchors",
                      api_visibility="undocumented")


def builder_tabs(page: Page, builder_anchor: gr.Dropdown, result: gr.Markdown) -> tuple[list, gr.Plot]:
    """One tab per method. Returns (button, kind, inputs, argument names) for each background builder,
    and the shrink tab's plot."""
    with gr.Tabs():
        with gr.Tab("Elastic (Once-for-All)"):
            gr.Markdown("Sub-networks keeping the first blocks of each stage and the most important "
                        "channels / hidden units / heads; an accuracy predictor picks the best under each budget.")
            with gr.Row():
                elastic_metric = gr.Dropdown([("MACs", "macs"), ("activations", "activations"),
                                              ("latency, measured on this server", "latency")],
                                             value="macs", label="budget on")
                elastic_budgets = gr.Textbox("30, 50, 70, 90", label="budgets (% of its own)")
                elastic_samples = gr.Number(24, label="measured samples")
                elastic_bn = gr.Number(512, label="BatchNorm re-estimation images",
                                       info="per sub-network, CNNs only; 0 keeps the anchor's statistics")
                elastic_ft = gr.Number(0, label="progressive-shrinking steps",
                                       info="fine-tune the anchor's shared weights first (0: as they are; anchors only)")
            elastic_btn = gr.Button("Search sub-networks", variant="primary")
        with gr.Tab("Shrink (DMS)"):
            gr.Markdown("Differentiable top-k on every width and block toward a MACs target, then the "
                        "static pruned network (no fine-tune).")
            with gr.Row():
                shrink_target = gr.Slider(5, 95, value=60, step=1, label="target (% of its MACs)")
                shrink_steps = gr.Number(100, label="search steps")
            shrink_btn = gr.Button("Shrink", variant="primary")
            shrink_plot = gr.Plot(label="soft MACs vs target · keep ratios")
        with gr.Tab("Fold"):
            gr.Markdown("Fold what is linear (conv+BN, linear branches) into fewer layers; every fold is "
                        "checked on real images and refused if not exact.")
            fold_btn = gr.Button("Fold it", variant="primary")
        with gr.Tab("Scale (Fast Scaling)"):
            scale_tab(page, builder_anchor, result)
    starts = [(elastic_btn, "elastic", [elastic_metric, elastic_budgets, elastic_samples, elastic_bn, elastic_ft],
               ("metric", "budgets", "samples", "bn_images", "finetune_steps")),
              (shrink_btn, "shrink", [shrink_target, shrink_steps], ("target_pct", "steps")),
              (fold_btn, "fold", [], ())]
    return starts, shrink_plot


def scale_tab(page: Page, builder_anchor: gr.Dropdown, result: gr.Markdown) -> None:
    """Fast Scaling (dWr): a scaled anchor with predicted costs, the size that fills the biggest gap,
    and whether latency follows MACs or activations."""
    gr.Markdown("dWr scaling (depth, width, resolution; alpha 0.8) with predicted costs: where a "
                "missing anchor size would go.")
    with gr.Row():
        scale_factor = gr.Number(2.0, label="scale factor s (MACs)")
        scale_alpha = gr.Number(0.8, label="alpha")
    with gr.Row():
        scale_btn = gr.Button("Scale the anchor")
        fill_btn = gr.Button("Fill the biggest gap")
        r2_btn = gr.Button("Latency: MACs or activations?")

    def scale_click(fill: bool):
        def handler(key: str, anchor, factor, alpha, x: str):
            try:
                s = page.session_of(key)
                return (views.md_safe(s.scale(anchor, factor, alpha, fill=fill)), curve_view(s, x),
                        _status("scale candidate added (predicted costs: listed, not drawn)"))
            except Exception as e:
                return gr.skip(), gr.skip(), _status(_message(e), True)
        return handler

    inputs = [page.session, builder_anchor, scale_factor, scale_alpha, page.axis]
    scale_btn.click(scale_click(False), inputs, [result, page.curve, page.status], api_name="scale")
    fill_btn.click(scale_click(True), inputs, [result, page.curve, page.status], api_name="scale_fill")

    def r2_click(key: str):
        try:
            return views.md_safe(page.session_of(key).latency_fit_md()), _status("latency fit: R² below")
        except Exception as e:
            return gr.skip(), _status(_message(e), True)

    r2_btn.click(r2_click, [page.session], [result, page.status], api_name="latency_fit")


def _short_spec(spec: str) -> str:
    return spec.rstrip("/").rsplit("/", 1)[-1].split(":")[-1]


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, max_upload: str = "20mb",
           **kwargs):
    """Launch with the safe defaults: local only, no share link, capped uploads, no analytics."""
    demo.queue(default_concurrency_limit=8, max_size=64)
    return demo.launch(server_name=host, server_port=port, share=False, max_file_size=max_upload,
                       css=(ASSETS / "app.css").read_text(), theme=gr.themes.Default(primary_hue="blue"),
                       show_error=False, footer_links=["api"], **kwargs)

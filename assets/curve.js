// The accuracy curve: a plotly figure (built by composer/curve.py, sent as props.value) drawn with
// the plotly.js that ships in the plotly wheel (loaded by `head`, no CDN).
// Clicking a point sends 'point_click' {id: stitch id} to Python, which selects that stitch.
const plot = element.querySelector(".zc-curve-plot");
const empty = element.querySelector(".zc-curve-empty");
let bound = false;

function draw() {
  const v = props.value;
  if (!v || !v.data) {
    empty.style.display = "";
    empty.textContent = (v && v.message) || "The curve appears after fitting (step 3).";
    plot.style.display = "none";
    return;
  }
  if (typeof Plotly === "undefined") { setTimeout(draw, 200); return; }
  empty.style.display = "none";
  plot.style.display = "";
  Plotly.react(plot, v.data, v.layout, {displaylogo: false, responsive: true,
                                        modeBarButtonsToRemove: ["select2d", "lasso2d", "toImage"]});
  if (!bound) {
    plot.on("plotly_click", (ev) => {
      const p = ev.points && ev.points.find(q => q.customdata !== undefined && q.customdata !== null);
      if (p) trigger("point_click", {id: Array.isArray(p.customdata) ? p.customdata[0] : p.customdata});
    });
    bound = true;
  }
}

watch("value", draw);
draw();

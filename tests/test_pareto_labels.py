"""pareto.png: no strategy's label is drawn over another's, however close their points."""

import itertools

import matplotlib

matplotlib.use("Agg")

from safe_cli.evaluation import outputs  # noqa: E402


def _point(name, kind, compute, accuracy):
    return {"strategy": name, "kind": kind, "relative_audio_compute": compute, "accuracy": accuracy}


# As a real report has them: always-4/8/12 at nearly the same accuracy and compute, the oracle, the
# policy and the gate in a second cluster, always-0 and a weak point low down, and the gate's curve.
STRATEGIES = [
    _point("always-0", "fixed", 0.0, 0.50), _point("always-4", "fixed", 0.98, 0.9010),
    _point("always-8", "fixed", 0.99, 0.9020), _point("always-12", "fixed", 1.0, 0.9015),
    _point("oracle", "oracle", 0.50, 0.9030), _point("policy", "policy", 0.51, 0.9025),
    _point("gate", "gate", 0.505, 0.9028), _point("weak", "policy", 0.01, 0.505),
    *[_point(f"gate@{t:g}", "gate-curve", t, 0.5 + 0.4 * t) for t in (0.05, 0.5, 0.95)],
]


def test_pareto_labels_do_not_overlap(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(outputs, "_save_figure", lambda figure, path: figures.append(figure))
    outputs.plot_pareto({"strategies": STRATEGIES}, tmp_path / "pareto.png")
    (figure,) = figures
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    labels = [text for text in figure.axes[0].texts if text.get_text()]  # leader lines have no text
    assert sorted(t.get_text() for t in labels) == sorted(p["strategy"] for p in STRATEGIES
                                                          if p["kind"] != "gate-curve")
    boxes = {label.get_text(): label.get_window_extent(renderer) for label in labels}
    for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap"

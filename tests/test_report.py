"""The self-contained HTML report (`python -m analyzers report`, dashboard/report.py), checked against the run it
reports: its sections, its confusion counts against scikit-learn, its thumbnails against the dataset's own pixels,
its thumbnail budget, its provenance against run.json, and its comparison deltas against the two runs' samples.
The browser test (tests/test_e2e_report.py) opens each sample's report with every request intercepted."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from analyzers.loading.runs import open_run
from dashboard.report import SECTIONS, build_report

ROOT = Path(__file__).resolve().parents[1]
IMAGE = re.compile(r'<img alt="sample ([^"]*)" src="data:image/png;base64,([^"]+)"')


@pytest.fixture(scope="module")
def explained_digits(sample_run_dir, tmp_path_factory):
    """A copy of the digits run with saliency maps of three samples stored (python -m analyzers explain)."""
    from analyzers.explanations.explain_run import explain_run

    run_dir = tmp_path_factory.mktemp("report") / "digits"
    shutil.copytree(sample_run_dir("digits"), run_dir)
    # only this fixture's maps: the shared run may hold those of other tests (the live dashboard's Explain page)
    shutil.rmtree(run_dir / "explanations", ignore_errors=True)
    ids = open_run(run_dir).sample_table["id"].to_numpy()[:3].tolist()
    explain_run(run_dir, ids, ["saliency"], sanity=False)
    return run_dir, ids


def _without_plotly_js(text: str) -> str:
    from plotly.offline import get_plotlyjs

    return text.replace(get_plotlyjs(), "")


def test_the_report_holds_every_section_and_opens_offline(explained_digits):
    from plotly.offline import get_plotlyjs

    run_dir, ids = explained_digits
    report = build_report(run_dir)
    text = report.to_html()
    for key in SECTIONS:
        assert f'<section id="{key}">' in text, key
    # everything but the comparison (no second run given) applies to the digits run
    assert [p.key for p in report.panels if p.skipped] == ["comparison"]
    assert text.count(get_plotlyjs()) == 1  # plotly.js inlined once
    ours = _without_plotly_js(text)
    # no reference to another host: every src is a data URI, nothing links anywhere
    assert not re.search(r'\b(?:src|href)\s*=\s*(?!["\']?data:)', ours), re.findall(r'(?:src|href)=\S{0,40}', ours)
    assert "http://" not in ours and "https://" not in ours
    assert "default-src 'none'" in ours  # and a Content-Security-Policy that refuses any request
    # the stored explanations are drawn, each with its faithfulness scores beside it
    explanations = report.panel("explanations")
    titles = [f.layout.title.text for part in explanations.parts if hasattr(part, "figures") for f in part.figures]
    assert len(titles) == len(ids) and all("del " in t and "ins " in t for t in titles)


def test_thumbnails_and_explanation_maps_share_one_image_budget(explained_digits):
    run_dir, ids = explained_digits
    full = build_report(run_dir)
    # counted apart: the <img> thumbnails of the galleries, the maps as plotly figures over the input
    assert len(IMAGE.findall(full.to_html())) == full.thumbnails > 0 and full.explanation_maps == len(ids)
    for budget in (0, 2, full.thumbnails + 1):
        report = build_report(run_dir, max_thumbnails=budget)
        assert len(IMAGE.findall(report.to_html())) == report.thumbnails
        assert report.thumbnails + report.explanation_maps <= budget
    # the galleries come first and take the budget; the maps get what is left
    assert build_report(run_dir, max_thumbnails=full.thumbnails + 1).explanation_maps == 1


def test_provenance_names_the_files_hashes_and_versions(explained_digits):
    run_dir, _ = explained_digits
    info = open_run(run_dir).info
    text = build_report(run_dir).to_html()
    provenance = text[text.index('<section id="provenance">'):text.index('<section id="headline">')]
    assert info["model"]["sha256"] in provenance and info["dataset"]["sha256"] in provenance
    assert f"&quot;torch&quot;: &quot;{info['packages']['torch']}&quot;" in provenance
    assert "batch_size" in provenance  # the run's parameters


def test_the_confusion_matrix_is_scikit_learns(explained_digits):
    run_dir, _ = explained_digits
    run = open_run(run_dir)
    figure = build_report(run, load_inputs=False).panel("confusion").parts[0]
    samples = run.samples
    expected = confusion_matrix(samples["label"], samples["pred"], labels=range(len(run.class_names)))
    heatmap = next(t for t in figure.data if t.type == "heatmap")
    assert np.array_equal(np.asarray(heatmap.z, dtype=np.int64), expected)


def test_thumbnails_are_the_samples_own_pixels_and_keep_to_the_budget(sample_run_dir):
    from PIL import Image

    from analyzers.loading.datasets import load_dataset

    run = open_run(sample_run_dir("shapes"))
    full = build_report(run)
    text = full.to_html()
    found = IMAGE.findall(text)
    assert 0 < len(found) == full.thumbnails <= 200
    dataset = load_dataset("sample:shapes")
    rows = run.sample_table.positions([found[0][0]])
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(found[0][1]))), dtype=np.float64) / 255
    x = np.asarray(dataset.x[rows[0]], dtype=np.float64)  # (C, H, W), scaled to [0, 1] by the sample
    picture = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
    lo, hi = picture.min(), picture.max()
    if lo < -1e-3 or hi > 1 + 1e-3:
        picture = (picture - lo) / (hi - lo)
    scale = pixels.shape[0] // picture.shape[0]
    enlarged = np.kron(picture, np.ones((scale, scale) + (1,) * (picture.ndim - 2)))
    assert scale > 1 and np.abs(pixels - enlarged).max() <= 1 / 255 + 1e-6
    small = build_report(run, max_thumbnails=5)
    assert small.thumbnails == 5 and len(IMAGE.findall(small.to_html())) == 5
    # the galleries past the budget still list their samples, as text
    assert small.to_html().count("<figcaption") == 5 and "id " in small.panel("label_noise").parts[-1].text
    with pytest.raises(Exception, match="max_thumbnails"):
        build_report(run, max_thumbnails=-1)


def test_a_regression_report_draws_its_targets_and_skips_what_is_a_classifiers(sample_run_dir):
    run = open_run(sample_run_dir("prices"))
    report = build_report(run, load_inputs=False)
    scatter = report.panel("confusion").parts[0]
    samples = run.samples
    points = next(t for t in scatter.data if len(t.x))
    by_id = dict(zip(samples["id"].astype(str), zip(samples["target"], samples["prediction"])))
    for x, y, sample_id in list(zip(points.x, points.y, points.customdata))[:50]:
        assert (x, y) == pytest.approx(by_id[str(sample_id)])
    assert report.panel("calibration").skipped and "regression" in report.panel("calibration").skipped
    headline = report.panel("headline").parts[0].text
    mae = float(np.abs(samples["target"] - samples["prediction"]).mean())
    assert f"<td>mae</td><td>{mae:.4g}</td>" in headline


def test_a_comparison_report_gives_the_deltas(tmp_path, sample_run_dir):
    """Two runs of the digits data: the sample model, and the same with its last layer perturbed."""
    from conftest import perturbed_digits_run

    run_b = perturbed_digits_run(tmp_path, scale=0.5)
    a, b = open_run(sample_run_dir("digits")), open_run(run_b)
    panel = build_report(a, compare=b, load_inputs=False).panel("comparison")
    assert panel.skipped is None
    delta = b.samples["correct"].mean() - a.samples["correct"].mean()
    assert f"<td>accuracy</td><td>{a.samples['correct'].mean():.4g}</td><td>{b.samples['correct'].mean():.4g}" \
           f"</td><td>{delta:.4g}</td>" in panel.parts[0].text


def test_the_report_command(explained_digits, tmp_path):
    run_dir, _ = explained_digits
    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "analyzers", "report", str(run_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size < 15e6 and "report written to" in done.stdout
    assert all(f'<section id="{key}">' in out.read_text() for key in SECTIONS)
    refused = subprocess.run([sys.executable, "-m", "analyzers", "report", str(run_dir), "--out", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "is a directory" in refused.stderr
    assert out.exists()  # a refused write leaves what was there

"""Concepts, TCAV scores with their significance test (issue 13): the shapes sample's planted background cue (green
goes with "square" in training) is found, significant and high for "square" at the last convolution block, while a
random subset of rows is not; a linear model where the concept direction is known exactly scores 1 and 0; the model
is left as it was, the same seed gives the same numbers, the result crosses the worker's wire, and bad options get
one line naming the fix."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError
from analyzers.errors import InvalidOption
from analyzers.explanations.concepts import TcavScores, concept_rows, tcav_scores
from analyzers.guard import _hook_count
from analyzers.loading import wire

PLANTED_LAYER = "relu3"  # sample_models/shapes.py conv_net: the last convolution block, before global max pooling
SETS = 6  # random sets: few, to keep the file fast
PER_SET = 30
SUBSET = 600  # rows of the shapes test split


@pytest.fixture(scope="module")
def shapes():
    from analyzers.loading.models import load_model
    from sample_models import get_sample

    sample = get_sample("shapes")
    data = sample.load_data("test")
    metadata = {k: np.asarray(v)[:SUBSET] for k, v in data.metadata.items()}
    return load_model("sample:shapes"), data.x[:SUBSET], data.y[:SUBSET], metadata, sample.class_names


def _tcav(shapes, rows, target_name, **options):
    model, x, y, _, names = shapes
    options = {"layers": PLANTED_LAYER, "random_sets": SETS, "samples_per_set": PER_SET, "seed": 0, **options}
    return tcav_scores(model, x, concept_rows=rows, target=names.index(target_name), labels=y, **options)


def test_the_planted_background_cue_is_significant_for_square_and_a_random_concept_is_not(shapes):
    _, x, _, metadata, _ = shapes
    green = concept_rows(metadata, "background", "green")
    assert 150 < len(green) < 250 and (metadata["background"][green] == "green").all()

    square = _tcav(shapes, green, "square")
    assert square.layers == (PLANTED_LAYER,) and square.random_sets == SETS and square.samples_per_set == PER_SET
    assert square.score[0] > 0.7 and square.significant[0] and square.p_value[0] < 0.05, square.table()
    assert abs(square.null_score[0] - 0.5) < 0.2  # random against random: a coin toss on average
    assert square.cav_accuracy.mean() > 0.8  # the layer tells green backgrounds from the others
    assert np.isin(square.concept_sample, green).all() and not np.isin(square.random_rows, green).any()

    # the cue pushes the other classes the other way: clearly for triangle (blue's class); for circle (red's) the
    # score is lower than square's and never significantly towards circle
    triangle = _tcav(shapes, green, "triangle")
    assert triangle.score[0] < 0.3 and triangle.significant[0], triangle.table()
    circle = _tcav(shapes, green, "circle")
    assert circle.score[0] < square.score[0] - 0.2, circle.table()
    assert not (circle.significant[0] and circle.score[0] > circle.null_score[0]), circle.table()

    # a random concept: a random subset of rows as large as the green one, not a metadata value
    random_rows = np.sort(np.random.default_rng(7).choice(len(x), len(green), replace=False))
    control = _tcav(shapes, random_rows, "square")
    assert not control.significant[0] and control.p_value[0] > 0.05, control.table()
    assert abs(control.score[0] - 0.5) < 0.2

    table = square.table()
    assert list(table.columns[:6]) == ["layer", "score", "null_score", "p_value", "p_adjusted", "significant"]
    assert len(table.loc[0, "concept_scores"]) == SETS


def _linear_model() -> nn.Module:
    """2-D inputs; `features` is the identity; logit 0 rises along e1, logit 1 falls along it."""
    model = nn.Sequential(OrderedDict(features=nn.Linear(2, 2), head=nn.Linear(2, 2)))
    with torch.no_grad():
        model.features.weight.copy_(torch.eye(2))
        model.features.bias.zero_()
        model.head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model.head.bias.zero_()
    return model


def _linear_data():
    """200 points of N(0, I); the concept is rows 0-39, shifted by +3 along e1."""
    x = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    x[:40, 0] += 3.0
    return x, np.arange(40)


def test_a_concept_along_e1_scores_one_for_the_logit_that_rises_along_it_and_zero_for_the_one_that_falls():
    x, concept = _linear_data()
    # the gradient of logit 0 with respect to `features` is +e1 for every input, the CAV points along +e1: every
    # directional derivative is positive; logit 1's gradient is -e1: every one is negative
    up = tcav_scores(_linear_model(), x, concept_rows=concept, target=0, layers="features", random_sets=8,
                     samples_per_set=20)
    down = tcav_scores(_linear_model(), x, concept_rows=concept, target=1, layers="features", random_sets=8,
                       samples_per_set=20)
    np.testing.assert_array_equal(up.concept_scores, np.ones((1, 8)))
    np.testing.assert_array_equal(down.concept_scores, np.zeros((1, 8)))
    assert up.num_inputs == len(x) and up.concept_size == 40
    # random against random: the CAV's sign along e1 is a coin toss, so each null score is 0 or 1
    assert set(np.unique(up.null_scores)) <= {0.0, 1.0} and 0 < up.null_score[0] < 1
    np.testing.assert_allclose(down.null_scores, 1 - up.null_scores)
    assert up.significant[0] and down.significant[0] and up.p_value[0] < 0.05

    # the same seed gives the same numbers, another seed other random sets
    again = tcav_scores(_linear_model(), x, concept_rows=concept, target=0, layers="features", random_sets=8,
                        samples_per_set=20)
    for name in ("concept_scores", "null_scores", "cav_accuracy", "random_rows", "concept_sample", "p_value"):
        np.testing.assert_array_equal(getattr(again, name), getattr(up, name))
    other = tcav_scores(_linear_model(), x, concept_rows=concept, target=0, layers="features", random_sets=8,
                        samples_per_set=20, seed=1)
    assert not np.array_equal(other.random_rows, up.random_rows)

    # concept samples of their own (a folder of images, read by the caller), and the scored rows chosen by labels
    labels = np.where(np.arange(len(x)) % 2 == 0, 0, 1)
    own = tcav_scores(_linear_model(), x, concept_inputs=x[:40] + np.float32([1, 0]), target=0, labels=labels,
                      layers=["features"], random_sets=4, samples_per_set=20)
    assert own.num_inputs == 100 and (own.concept_scores == 1).all()

    # the result crosses the sandboxed worker's wire as it is
    back = wire.decode(*wire.encode(up))
    assert isinstance(back, TcavScores) and back.layers == up.layers
    np.testing.assert_array_equal(back.concept_scores, up.concept_scores)
    np.testing.assert_array_equal(back.significant, up.significant)


def test_the_model_is_left_as_it_was_and_bad_options_get_one_line_naming_the_fix():
    x, concept = _linear_data()
    model = _linear_model().train()  # in train mode, a frozen layer, a stale .grad: all must come back as they were
    model.features.weight.requires_grad_(False)
    model.head.weight.grad = torch.full((2, 2), 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_count(model)
    result = tcav_scores(model, x, concept_rows=concept, target=0, layers="features", random_sets=3,
                         samples_per_set=10, batch_size=16)
    assert (result.concept_scores == 1).all()  # a gradient reaches the layer although its weight is frozen
    assert model.training and all(m.training for m in model.modules())
    assert not model.features.weight.requires_grad and model.head.weight.requires_grad
    assert torch.equal(model.head.weight.grad, torch.full((2, 2), 0.5)) and model.features.bias.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and _hook_count(model) == hooks

    def refused(match, **options):
        kwargs = {"concept_rows": concept, "target": 0, "layers": "features", "random_sets": 3,
                  "samples_per_set": 10, **options}
        with pytest.raises(InvalidOption, match=match) as caught:
            tcav_scores(model, x, **kwargs)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "at least 2" in refused("random_sets", random_sets=1)
    assert "choose" in refused("no samples", concept_rows=[])
    assert "head" in refused("no layer 'conv9'", layers="conv9")  # names the layers there are
    refused("target 5 is not an output", target=5)
    refused("not both", concept_inputs=x[:5])
    refused("samples_per_set", samples_per_set=1)
    refused("outside the inputs", concept_rows=[0, 500])
    assert model.training and _hook_count(model) == hooks

    with pytest.raises(InvalidOption, match="no column 'colour'.*background"):
        concept_rows({"background": np.array(["red", "green"])}, "colour", "green")
    with pytest.raises(InvalidOption, match="such as red, green"):
        concept_rows({"background": np.array(["red", "green"])}, "background", "purple")
    np.testing.assert_array_equal(concept_rows({"flag": np.array([True, False, True])}, "flag", "True"), [0, 2])
    assert issubclass(InvalidOption, AnalyzerError)


# --- concepts of a stored run: three ways to name one, kept in the run --------------------------------------------

RUN_OPTIONS = {"layers": [PLANTED_LAYER], "random_sets": SETS, "samples_per_set": PER_SET}


@pytest.fixture(scope="module")
def shapes_run(sample_run_dir, tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("tcav-run") / "shapes"
    shutil.copytree(sample_run_dir("shapes"), path)
    from analyzers.engines.pipeline import load_run_inputs
    from analyzers.loading.runs import open_run

    return path, *load_run_inputs(open_run(path))


def _png_zip(folders: dict) -> bytes:
    """A zip of concept folders: {folder: (N, 3, H, W) images in [0, 1]} as 8-bit PNGs."""
    import io
    import zipfile

    from PIL import Image

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for folder, images in folders.items():
            for i, image in enumerate(images):
                pixels = np.round(np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, format="PNG")
                archive.writestr(f"concepts/{folder}/{i:03d}.png", png.getvalue())
    return out.getvalue()


def test_a_runs_concept_by_metadata_by_selection_and_by_images_finds_the_planted_cue_and_is_kept(shapes_run,
                                                                                                 monkeypatch):
    import analyzers.explanations.concepts as concepts

    path, model, dataset = shapes_run
    square = list(dataset.class_names).index("square")
    calls = []
    real = concepts.tcav_scores
    monkeypatch.setattr(concepts, "tcav_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    by_value = concepts.run_tcav(path, concept={"kind": "metadata", "column": "background", "value": "green"},
                                 target=square, **RUN_OPTIONS)
    assert by_value.score[0] > 0.7 and by_value.significant[0], by_value.table()
    # the same rows as a selection of ids give the same numbers: the same concept, however it was named
    green = concept_rows(dataset.metadata, "background", "green")
    by_ids = concepts.run_tcav(path, concept={"kind": "ids", "ids": [str(i) for i in dataset.ids[green]]},
                               target=square, **RUN_OPTIONS)
    np.testing.assert_array_equal(by_ids.concept_scores, by_value.concept_scores)
    # the same images written as PNGs and read back as concept images (8-bit: close, not equal)
    archive = _png_zip({"green": dataset.x[green], "red": dataset.x[concept_rows(dataset.metadata, "background",
                                                                                 "red")[:20]]})
    decoded = concepts.concept_folder_inputs(model, np.frombuffer(archive, np.uint8), name="concepts.zip",
                                             image_size=None)
    assert decoded["concepts"] == ["green", "red"]
    images = decoded["x"][decoded["concept"] == 0]
    np.testing.assert_allclose(images, dataset.x[green], atol=0.5 / 255 + 1e-6)
    by_images = concepts.run_tcav(path, concept={"kind": "images", "sha256": "z" * 64, "folder": "green"},
                                  concept_inputs=images, target=square, **RUN_OPTIONS)
    assert by_images.score[0] > 0.7 and by_images.significant[0], by_images.table()
    assert len(calls) == 3

    # kept in the run: asked again, read back without computing; listed for the page, newest first
    again = concepts.run_tcav(path, concept={"kind": "metadata", "column": "background", "value": "green"},
                              target=square, **RUN_OPTIONS)
    assert len(calls) == 3
    np.testing.assert_array_equal(again.concept_scores, by_value.concept_scores)
    kept = concepts.stored_tcav(path)
    assert sorted(label for label, _, _ in kept) == sorted(["background = green",
                                                            f"a selection of {len(green)} samples",
                                                            "concept images: green"])
    # another class is another result
    concepts.run_tcav(path, concept={"kind": "metadata", "column": "background", "value": "green"},
                      target=list(dataset.class_names).index("triangle"), **RUN_OPTIONS)
    assert len(calls) == 4 and len(concepts.stored_tcav(path)) == 4


def test_a_runs_concept_refuses_what_it_cannot_score_in_one_line(shapes_run, tmp_path):
    import analyzers.explanations.concepts as concepts

    path, model, _ = shapes_run
    with pytest.raises(InvalidOption, match="kind one of metadata, ids, images"):
        concepts.run_tcav(path, concept={"kind": "slice"}, target=0, **RUN_OPTIONS)
    with pytest.raises(InvalidOption, match="not in this run"):
        concepts.run_tcav(path, concept={"kind": "ids", "ids": ["no-such-id"] * 3}, target=0, **RUN_OPTIONS)
    with pytest.raises(InvalidOption, match="decoded inputs"):
        concepts.run_tcav(path, concept={"kind": "images", "sha256": "0", "folder": "x"}, target=0, **RUN_OPTIONS)
    with pytest.raises(AnalyzerError, match="not inside a concept folder"):
        import io
        import zipfile

        flat = io.BytesIO()
        with zipfile.ZipFile(flat, "w") as archive:
            archive.writestr("one.png", b"")
        concepts.concept_folder_inputs(model, np.frombuffer(flat.getvalue(), np.uint8), name="flat.zip",
                                       image_size=None)
    stored = path / concepts.TCAV_DIR
    stored.mkdir(parents=True, exist_ok=True)
    (stored / "broken.npz").write_bytes(b"not an npz")
    with pytest.raises(AnalyzerError, match=r"broken.npz .* cannot be read .*delete it"):
        concepts.stored_tcav(path)
    (stored / "broken.npz").unlink()


def test_an_uploaded_concept_zip_is_decoded_in_the_sandboxed_worker_with_the_upload_bounds(monkeypatch):
    """Concept images are a file someone uploaded: with a sandboxed model they are parsed only in its worker (the
    parent's reader is broken here and never called), and the dataset reader's bounds refuse a bomb or a path out."""
    import io
    import zipfile

    import analyzers.loading.datasets as datasets
    from analyzers.explanations.concepts import concept_folder_inputs
    from analyzers.loading.models import load_model

    images = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    rgb = {"dots": np.repeat(images, 3, axis=1)}
    archive = np.frombuffer(_png_zip(rgb), np.uint8)
    monkeypatch.setattr(datasets, "read_image_folders", lambda *a, **k: pytest.fail("parsed in the parent"))
    model = load_model("sample:digits", isolation="sandbox")
    try:
        decoded = concept_folder_inputs(model, archive, name="dots.zip", image_size=None)
        assert decoded["concepts"] == ["dots"] and decoded["x"].shape == (4, 1, 8, 8)
        grey = np.round(images * 255) / 255  # RGB PNGs of equal channels read back as one grey channel
        np.testing.assert_allclose(decoded["x"], grey, atol=1 / 255 + 1e-6)
        bombs = {"a bomb": {"dots/0.png": b"\0" * (20 << 20)}, "a path out": {"../dots/0.png": b"x"}}
        for what, members in bombs.items():
            raw = io.BytesIO()
            with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as out:
                for member, content in members.items():
                    out.writestr(member, content)
            with pytest.raises(AnalyzerError, match="zip bomb|unsafe path"):
                concept_folder_inputs(model, np.frombuffer(raw.getvalue(), np.uint8), name="c.zip", image_size=None)
    finally:
        model.close()

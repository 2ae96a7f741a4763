"""Inside the network: one sample's feature maps at a layer, strongest channel first, and the dataset's samples that
activate a chosen channel or unit most (analyzers.explanations.feature_maps)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from analyzers.errors import AnalyzerError
from dashboard import components, data, figures, state
from dashboard.selection import id_positions
from dashboard.text import md

run = components.require_run(tasks=(*components.CLASS_TASKS, "regression", "multilabel"))
components.header("Inside the network", run, "What a layer's channels respond to: this sample's feature maps, and "
                                             "the samples of the whole dataset that activate a channel most.")
kinds = run.info["model"].get("layer_kinds") or {}
# layers worth looking into: convolutions, linear layers and the activations after them
layers = [name for name in run.info["model"].get("layers") or () if kinds.get(name, "").startswith(("conv", "linear",
                                                                                                      "relu"))]
if not layers:
    st.info("This model names no convolution, linear or activation layer to look into.")
    st.stop()
convs = [n for n in layers if kinds.get(n, "").startswith("conv")]
default = convs[-1] if convs else layers[0]
layer = st.selectbox("Layer", layers, index=layers.index(default), key="network-layer",
                     format_func=lambda n: f"{n} ({kinds.get(n, '?')})")

samples = run.sample_table
current = state.get("sample")
if current is None or len(id_positions(data.id_index(run), [current])) == 0:
    current = data.first_sample_to_explain(run)
row = int(id_positions(data.id_index(run), [current])[0])
try:
    model, dataset = data.run_inputs(run)
except AnalyzerError as exc:
    st.error(f"The model or data of this run cannot be loaded: {md(exc)}")
    st.stop()

from analyzers.explanations.feature_maps import layer_activations, run_top_activating  # noqa: E402

# ------------------------------------------------------------------------------------------ this sample's maps
st.subheader(f"Sample {md(current)} at {md(layer)}")
try:
    acts = layer_activations(model, dataset.x[row:row + 1], layer=layer)
except AnalyzerError as exc:  # a layer that never runs as a module (an attention block's output projection)
    st.warning(f"{md(exc)}.")
    acts = None


def _feature_maps_and_top_samples(acts) -> None:
    """This sample's maps at the layer, then the dataset's samples that activate a chosen channel most."""
    strength, order = acts.strength[0], acts.order[0]
    shown = 1 if len(order) == 1 else int(st.slider("Channels shown", 1, min(48, len(order)), min(18, len(order)),
                                                    key="network-shown"))  # a one-unit layer: a regression's output
    if acts.kind == "conv":
        st.plotly_chart(figures.feature_map_grid_figure(acts.activations[0], order[:shown], strength),
                        key="network-maps", config={"displayModeBar": False})
        st.caption(f"{len(order)} channels, strongest first by the mean of each map (the number under each is that "
                   f"mean). Each map has its own colour scale.")
    else:
        st.plotly_chart(figures.unit_bars_figure(order[:shown], strength,
                                                 y_title="activation" if acts.kind == "linear" else
                                                 "mean over tokens"),
                        key="network-units", config={"displayModeBar": False})
        st.caption(f"{len(order)} units, strongest first" + (" (the mean over the sample's tokens)."
                                                             if acts.kind == "tokens" else "."))
    components.page_link("explain", "Explain this sample", sample=str(current))

    # ---------------------------------------------------------------------------------- the dataset's top samples
    st.subheader("What a channel responds to")
    channel = st.selectbox("Channel or unit", [int(c) for c in order], key="network-channel",
                           format_func=lambda c: f"#{c} (this sample: {strength[c]:.3g})")
    k = int(st.number_input("Samples per channel", 1, 50, 12, key="network-k"))
    try:
        with components.progress_bar("Reading the dataset…", lambda done, total: f"{done:,} of {total:,} samples") \
                as on_batch:
            top, ids = run_top_activating(run.path, layer=layer, k=k, model=model, dataset=dataset, on_batch=on_batch)
    except AnalyzerError as exc:
        st.error(md(exc))
        return
    top_ids = [str(i) for i in ids[channel]]
    responses = ", ".join(f"{s:.3g}" for s in top.scores[channel][:6]) + ("…" if k > 6 else "")
    st.caption(f"The {len(top_ids)} of {top.num_samples:,} samples whose map of channel #{channel} reaches the "
               f"highest value (the {top.reduce} over its positions: {responses}); its mean over the dataset is "
               f"{top.mean_response[channel]:.3g}. Kept in the run.")
    if components.fresh("network-top", (layer, channel, k)):
        state.set_gallery(top_ids)
    components.gallery(run, top_ids, key="network-gallery", title=None)
    table = samples.rows(id_positions(data.id_index(run), top_ids))
    has_classes = data.run_task(run).has_classes
    labels = table["label"].map(lambda v: components.class_name(run, v) if has_classes else components.short(v))
    st.caption(f"Of these, {int(table['correct'].sum())} are right; their labels: " +
               ", ".join(f"{md(label)} ({n})" for label, n in labels.value_counts().head(5).items()) + ".")


if acts is not None:
    _feature_maps_and_top_samples(acts)

# ------------------------------------------------------------------------------------------------------- concepts
st.subheader("Concepts (TCAV)")
TCAV_COLUMNS = ("score", "null_score", "p_value", "p_adjusted", "cav_accuracy")


def _concept_choice():
    """(the concept as run_tcav takes it, its decoded images or None), or None when the source holds no concept."""
    import hashlib

    from analyzers.explanations.concepts import concept_folder_inputs

    sources = ["a metadata value", "the selected samples"] + (["concept images (a zip)"]
                                                              if run.info["dataset"]["modality"] == "image" else [])
    source = st.radio("The concept is", sources, horizontal=True, key="tcav-source")
    if source == "a metadata value":
        meta = [c for c in dataset.metadata.columns if c not in dataset.ground_truth_columns
                and dataset.metadata[c].nunique() <= 50]
        if not meta:
            st.caption("This dataset has no metadata column with a few values to name a concept by.")
            return None
        cols = st.columns(2)
        column = cols[0].selectbox("Metadata column", meta, key="tcav-column")
        value = cols[1].selectbox("Value", sorted(map(str, dataset.metadata[column].dropna().unique())),
                                  key="tcav-value")
        return {"kind": "metadata", "column": column, "value": value, "label": f"{column} = {value}"}, None
    if source == "the selected samples":
        # the selection made on the Embeddings page (this page's own gallery is the top-activating samples)
        selection = state.selection()
        chosen = list(selection.value) if selection is not None and selection.kind == "ids" else []
        if not chosen:
            st.caption("No samples are selected: select some on the Embeddings page (box or lasso), then come back.")
            return None
        st.caption(f"The {len(chosen):,} samples of the current selection (made on the Embeddings page) are the "
                   f"concept.")
        return {"kind": "ids", "ids": [str(i) for i in chosen], "label": f"a selection of {len(chosen)} samples"}, None
    upload = st.file_uploader("Concept images", type=["zip"], key="tcav-images",
                              help="A zip with one folder per concept (striped/001.png, ...): PNG or JPEG images, "
                                   "or .npy arrays for other band counts, read as this run's images were.")
    if upload is None:
        return None
    raw = upload.getvalue()
    pre = run.info.get("preprocessing") or {}
    try:
        decoded = concept_folder_inputs(model, np.frombuffer(raw, dtype=np.uint8), name=upload.name,
                                        image_size=pre.get("image_size"), mean=pre.get("mean"), std=pre.get("std"))
    except AnalyzerError as exc:
        st.error(md(exc))
        return None
    folder = st.selectbox("Concept folder", list(decoded["concepts"]), key="tcav-folder")
    index = list(decoded["concepts"]).index(folder)
    images = np.asarray(decoded["x"])[np.asarray(decoded["concept"]) == index]
    return ({"kind": "images", "sha256": hashlib.sha256(raw).hexdigest(), "folder": folder,
             "label": f"{folder} (from {upload.name})"}, images)


def _tcav_table(table) -> None:
    st.dataframe(table[["layer", *TCAV_COLUMNS[:4], "significant", "cav_accuracy"]], hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.3g") for c in TCAV_COLUMNS})


def _concepts_panel() -> None:
    st.caption("Does a concept push the model towards a class? A concept is a set of samples: those sharing a "
               "metadata value, a selection, or images of its own. Its activation vector at a layer separates them "
               "from random samples, and its TCAV score is the share of the class's samples whose score rises along "
               "it (Kim et al., 2018), tested against random concepts (two-sided t-test, Bonferroni over the layers).")
    choice = _concept_choice()
    names = run.class_names
    cols = st.columns(2)
    target = cols[0].selectbox("Class", list(range(len(names))), key="tcav-class", format_func=lambda c: names[c])
    concept_layers = cols[1].multiselect("Layers", layers, default=[layer], key="tcav-layers")
    if choice is not None and concept_layers and st.button("Score the concept", key="tcav-run"):
        concept, images = choice
        try:
            with components.progress_bar("Training concept activation vectors…",
                                         lambda done, total: f"Scoring {done:,} of {total:,} samples") as on_batch:
                table = data.tcav(run, concept, int(target), tuple(concept_layers), concept_inputs=images,
                                  on_batch=on_batch)
        except AnalyzerError as exc:
            st.error(md(exc))
            return
        _tcav_table(table)
        st.caption(f"score: the share of {md(names[target])} samples whose score rises along the concept "
                   f"\"{md(concept['label'])}\" (1: for every one); null: the same for random sets; cav_accuracy "
                   f"near 0.5 means the layer does not tell the concept apart. Kept in the run.")
    from analyzers.explanations.concepts import stored_tcav

    try:
        kept = stored_tcav(run.path)
    except AnalyzerError as exc:
        st.warning(md(exc))
        kept = []
    if kept:
        with st.expander(f"Concepts scored on this run ({len(kept)})"):
            import pandas as pd

            rows = [{"concept": label, "class": names[s.target] if s.target < len(names) else s.target, **row}
                    for label, _, s in kept for row in s.table().drop(columns=["concept_scores", "null_scores"])
                    .to_dict("records")]
            st.dataframe(pd.DataFrame(rows), hide_index=True, key="tcav-kept",
                         column_config={c: st.column_config.NumberColumn(format="%.3g") for c in TCAV_COLUMNS})


_concepts_panel()

# ------------------------------------------------------------------------------------------------------ attention
from analyzers.explanations.attention import (NoAttention, attention_rollout, attention_weights,  # noqa: E402
                                              token_relevance)

st.subheader(f"Attention of sample {md(current)}")
try:
    attention = attention_weights(model, dataset.x[row:row + 1])
except NoAttention as exc:
    st.caption(f"No attention to show: {md(exc)}.")
    st.stop()
except AnalyzerError as exc:
    st.error(md(exc))
    st.stop()
st.warning("Attention weights say where the model's tokens look, not why it decides: on their own they are not an "
           "explanation. The Explain page scores every map, attention rollout included, by what removing the tokens "
           "it names does to the prediction.")
if run.info["dataset"]["modality"] == "tokens":
    words = components.token_texts(run, dataset.x[row])
    keep = [i for i, w in enumerate(words) if w != "·"]  # positions the attention mask leaves out are not drawn
else:  # image patches (and a class token): numbered
    words = [str(i) for i in range(attention.weights[0].shape[-1])]
    keep = list(range(len(words)))
cols = st.columns([2, 1])
site = cols[0].selectbox("Attention layer", list(attention.layers), key="network-attention-layer",
                         format_func=lambda n: f"{n} ({attention.sources[attention.layers.index(n)]})")
w = attention.layer(site)[0]  # (heads, queries, keys)
head = cols[1].selectbox("Head", ["mean of heads", *range(w.shape[0])], key="network-attention-head")
matrix = w.mean(axis=0) if head == "mean of heads" else w[int(head)]
if len(keep) == matrix.shape[-1]:
    labels = [words[i] for i in keep]
    shown_matrix = matrix[np.ix_(keep, keep)]
else:  # the tokens the model attends over are not the input's (patches of an image, merged tokens)
    labels, shown_matrix = [str(i) for i in range(matrix.shape[-1])], matrix
left, right = st.columns(2, gap="large")
with left:
    which = "mean of heads" if head == "mean of heads" else f"head {head}"
    st.plotly_chart(figures.attention_figure(shown_matrix, labels, title=f"{site}, {which}"),
                    key="network-attention", config={"displayModeBar": False})
with right:
    rollout = attention_rollout(attention)
    st.plotly_chart(figures.attention_figure(rollout[0][np.ix_(keep, keep)] if len(keep) == rollout.shape[-1]
                                             else rollout[0], labels, title="rollout over every layer",
                                             colour_title="rollout"),
                    key="network-rollout", config={"displayModeBar": False})
st.caption("Rollout (Abnar and Zuidema, 2020): each layer's heads averaged, half of each token kept for the residual "
           "connection, and the layers multiplied from the first to the last: how much each token of the last layer "
           "draws on each input token.")
# the mean over the real tokens' rows: a padded position's row says nothing (its attention is masked)
attended = np.isin(np.arange(rollout.shape[-1]), keep)[None].astype(np.float32)
relevance = token_relevance(rollout, query="mean", mask=attended)[0]
top_tokens = np.argsort(-relevance)[:5]
st.markdown("Most drawn-on tokens (the mean over queries of the rollout): " + ", ".join(
    f"**{md(words[i]) if i < len(words) else i}** ({relevance[i]:.3f})" for i in top_tokens))
# the faithfulness score every map gets: remove the tokens the rollout names first, against a random order
if run.info["dataset"]["modality"] == "tokens" and len(relevance) == len(words):
    from analyzers.explanations.perturbation import deletion_insertion

    explained = int(samples["pred"].iloc[row]) if data.run_task(run).has_classes else 0
    try:
        curves = deletion_insertion(model, dataset.x[row:row + 1], relevance[None].astype(np.float32),
                                    np.array([explained]), signed=False)
        score = float(curves.deletion_vs_random[0])
        st.markdown(f"Faithfulness of the rollout as a map of the "
                    f"{'predicted class' if data.run_task(run).has_classes else 'first output'}: deletion vs a "
                    f"random order **{score:+.2f}** of the starting probability (0: no better than removing tokens at "
                    f"random; the Explain page gives the gradient maps' scores on the same scale).")
    except AnalyzerError as exc:
        st.caption(f"The rollout's faithfulness score does not apply here: {md(exc)}")

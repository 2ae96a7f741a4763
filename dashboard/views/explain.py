"""Explain a sample: its input, every class probability, and attribution maps with their faithfulness scores."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError
from dashboard import components, data, figures, sample_display, state
from dashboard.text import md
from dashboard.selection import gallery_place, id_positions, neighbours

run = components.require_run(tasks=(*components.CLASS_TASKS, "regression", "multilabel"))
components.header("Explain a sample", run)
task = data.run_task(run)
samples = run.sample_table
modality = run.info["dataset"]["modality"]

# ------------------------------------------------------------------------------------------------- which sample
gallery = state.gallery_ids()
current = state.get("sample")
if current is None or len(id_positions(data.id_index(run), [current])) == 0:
    if current is not None:
        st.warning(f"This run has no sample with id {md(repr(current))}.")
    current = str(gallery[0]) if len(gallery) else data.first_sample_to_explain(run)
    state.put("sample", current)
row = int(id_positions(data.id_index(run), [current])[0])
sample = samples.rows([row]).iloc[0]

nav = st.columns([1, 1, 3, 2], vertical_alignment="bottom")
prev_id, next_id = neighbours(gallery, current)
if nav[0].button("◀ Previous", disabled=prev_id is None, key="explain-prev", width="stretch"):
    state.put("sample", prev_id)
    st.rerun()
if nav[1].button("Next ▶", disabled=next_id is None, key="explain-next", width="stretch"):
    state.put("sample", next_id)
    st.rerun()
if (place := gallery_place(gallery, current)) is not None:
    nav[2].caption(f"Sample {place + 1:,} of {len(gallery):,} in the current selection")
typed = nav[3].text_input("Go to sample id", value="", key="explain-goto", placeholder="id")
if typed:
    if len(id_positions(data.id_index(run), [typed])):
        state.put("sample", typed)
        st.session_state.pop("explain-goto", None)
        st.rerun()
    else:
        nav[3].error(f"No sample {md(repr(typed))} in this run.")

if task.per_label:  # the maps explain one label each
    label = pred = 0
    wrongly = "; ".join(part for part in (f"missed {md(sample['missed'])}" if sample["missed"] else "",
                                          f"wrongly predicted {md(sample['false_alarms'])}"
                                          if sample["false_alarms"] else "") if part)
    st.subheader(f"Sample {md(sample['id'])} — labels {md(sample['label'])}, predicted {md(sample['pred'])} "
                 f"({'✓ every label right' if sample['correct'] else '✗ ' + wrongly})")
elif task.has_classes:
    label, pred = int(sample["label"]), int(sample["pred"])
    verdict = "✓ correct" if sample["correct"] else "✗ wrong"
    st.subheader(f"Sample {md(sample['id'])} — true {md(components.class_name(run, label))}, predicted "
                 f"{md(components.class_name(run, pred))} ({verdict}, confidence {sample['confidence']:.3f})")
else:  # a regression: the maps explain the predicted value
    label = pred = 0
    st.subheader(f"Sample {md(sample['id'])} — target {sample['target']:.4g}, predicted {sample['prediction']:.4g} "
                 f"(residual {sample['residual']:+.4g}{', one of the largest errors' if not sample['correct'] else ''})")

try:
    model, dataset = data.run_inputs(run)
except AnalyzerError as exc:
    st.error(f"The model or data of this run cannot be loaded: {md(exc)}")
    st.stop()
x = dataset.x[row]
from analyzers.explanations.explain_run import ground_truth_mask  # noqa: E402

truth = ground_truth_mask(dataset, np.array([row]))
truth = None if truth is None or not truth[0].any() else truth[0]  # an empty mask: no planted truth here

channels = int(np.asarray(x).shape[0]) if modality == "image" else 0
multispectral = channels > 3  # more bands than a picture shows: one, or three in false colour, picked by name
band_names = figures.band_labels(channels, run.info["dataset"].get("feature_names")) if multispectral else ()
shown_bands = None
# a spectrogram input (an audio dataset says so in its preprocessing): drawn with time and frequency axes, and played
spectrogram = sample_display.spectrogram_of(run, x)


def _picture(values) -> np.ndarray:
    """An image input as the page shows it: the bands picked for a multispectral one, else the run's display."""
    if not multispectral:
        return components.display_image(run, values)
    pre = run.info.get("preprocessing") or {}
    return figures.to_display_image(values, mean=pre.get("mean"), std=pre.get("std"), bands=shown_bands)


def _spectrogram(values, **overlay):
    return sample_display.spectrogram_figure(spectrogram, values, **overlay)


left, right = st.columns([3, 2], gap="large")
with left:
    st.markdown("**Input**")
    if multispectral:
        COMPOSITE = "false colour: three bands as red, green and blue"
        chosen = st.selectbox("Bands shown", [COMPOSITE, *band_names], key=f"explain-bands-{run.path.name}",
                              help=f"These images have {channels} bands; a picture shows three at most, each band "
                                   f"on its own scale. The maps are drawn over the same picture.")
        if chosen == COMPOSITE:
            default = figures.default_composite(band_names)
            picks = st.columns(3)
            shown_bands = tuple(pick.selectbox(f"{colour} shows", range(channels), index=default[i],
                                               format_func=lambda b: band_names[b],
                                               key=f"explain-band-{colour}-{run.path.name}")
                                for i, (pick, colour) in enumerate(zip(picks, ("Red", "Green", "Blue"))))
            st.session_state[components.BANDS_KEY] = shown_bands  # and galleries the same composite
        else:
            shown_bands = band_names.index(chosen)
            st.session_state[components.BANDS_KEY] = shown_bands  # and galleries the same band
        pre = run.info.get("preprocessing") or {}
        st.plotly_chart(figures.band_composite_figure(x, shown_bands, band_names, mean=pre.get("mean"),
                                                      std=pre.get("std"), height=300),
                        key="explain-input", config={"displayModeBar": False})
    elif spectrogram is not None:
        st.plotly_chart(_spectrogram(x[0]), key="explain-input", config={"displayModeBar": False})
        waveforms = dataset.extras.get(spectrogram.get("waveform") or "")
        if waveforms is not None and len(waveforms) == len(dataset.x):
            st.audio(np.asarray(waveforms[row], dtype=np.float32), sample_rate=int(spectrogram["sample_rate"]))
        else:
            st.caption("This dataset holds no waveform to play: the spectrogram alone is shown.")
    elif modality == "image":
        components.band_choice(run, int(np.asarray(x).shape[0]))
        st.plotly_chart(figures.image_figure(components.display_image(run, x), height=300), key="explain-input",
                        config={"displayModeBar": False})
    elif modality == "sequence":
        st.html(components.sequence_html(components.sequence_letters(x)))
    elif modality == "tokens":
        st.html(components.token_html(components.token_texts(run, x),
                                      words=components.token_vocabulary(run) is not None))
    else:
        names = run.info["dataset"].get("feature_names") or [f"feature {i}" for i in range(len(x))]
        st.dataframe(pd.DataFrame({"feature": names, "value": x}), hide_index=True, height=300)
    extra = [c for c in samples.columns if c not in ("id", "label", "pred", "confidence", "loss", "correct")
             and c not in (run.info["dataset"].get("feature_names") or [])]
    if extra:
        st.caption("Metadata: " + " · ".join(f"{md(c)} = {md(components.short(sample[c]))}" for c in extra))
with right:
    if task.per_label:
        st.markdown("**Probability of every label** (each on its own: they need not sum to 1)")
        st.plotly_chart(figures.probabilities_figure(run.probs[row], run.class_names), key="explain-probs",
                        config={"displayModeBar": False})
    elif task.has_classes:
        st.markdown("**Probability of every class**")
        st.plotly_chart(figures.probabilities_figure(run.probs[row], run.class_names, label=label, pred=pred),
                        key="explain-probs", config={"displayModeBar": False})
    else:
        st.markdown(f"**Absolute error** {sample['abs_error']:.4g}, against a mean of "
                    f"{samples['abs_error'].mean():.4g} over the run.")

# ----------------------------------------------------------------------------------------------------- attributions
from analyzers.explanations.attributions import (COMPLETE_METHODS, METHODS, describe_settings,  # noqa: E402
                                                 per_standard_deviation)

# what an additive method's map must sum to: its completeness gap is the relative miss
_SUMS_TO = {"integrated_gradients": "the map's sum misses f(input) − f(baseline) by this share",
            "shap": "the map's sum misses f(input) − mean f(background) by this share"}
from analyzers.explanations.explain_run import sample_map, sample_scores, sanity_controls  # noqa: E402
from analyzers.explanations.faithfulness import SANITY_THRESHOLD, SMOOTH_SAMPLES  # noqa: E402

available, defaults, conv_layers = data.explain_methods(run)
# the methods get the page's whole width: in a column, five chips scrolled and hid "Integrated Gradients"
methods = st.multiselect("Methods", available, default=defaults, key="explain-methods",
                         format_func=lambda m: METHODS[m].label)
controls = st.columns([3, 1], vertical_alignment="bottom")
layer = None
gradcam_needs_layer = False
if "gradcam" in methods:
    try:
        token_layers = data.gradcam_token_layers(run)
    except AnalyzerError as exc:
        token_layers = []
        st.warning(f"The model's token layers could not be listed: {md(exc)}")
    AUTOMATIC = "automatic: the main path's last spatial convolution"
    choices = ([] if modality == "tokens" else [AUTOMATIC, *conv_layers]) + token_layers
    layer = controls[0].selectbox("Grad-CAM layer", choices, key="explain-layer", index=None if modality == "tokens"
                                  else 0, placeholder="choose a token layer",
                                  help="Convolutions give a spatial map; a layer over tokens gives one score per "
                                       "token (or per image patch). Layers that run twice are refused.")
    layer = None if layer == AUTOMATIC else layer
    gradcam_needs_layer = modality == "tokens" and layer is None
if modality == "tokens":
    st.caption("Token ids take no gradient, so the gradient methods work through the embedding layer that looks them "
               "up: one score per token, summed over the embedding's width; occlusion and LIME remove tokens "
               "instead. A removed token (occlusion, LIME, deletion, the Integrated Gradients baseline) becomes the "
               "pad id 0 and keeps its attention mask.")
sanity = controls[1].toggle("Sanity check", value=True, key="explain-sanity",
                            help="Re-initialise every layer of the model and measure how much the map changes "
                                 "(Adebayo et al., 2018): Spearman's rank correlation of |map|, ties kept, as in "
                                 "Quantus' MPRT. The verdict is taken once on a fixed probe set: it fails when the "
                                 "95% interval of the mean |ρ| lies above the threshold, passes when it lies below, "
                                 "and is inconclusive otherwise. Each sample then costs one more map. Cached in "
                                 "the run.")
per_std = False
if modality == "tabular":
    spread = np.asarray(dataset.x, dtype=np.float64).std(axis=0)
    uneven = spread.max() > 100 * max(spread[spread > 0].min(initial=spread.max()), 1e-12)
    per_std = st.toggle("Gradients per standard deviation", value=True, key="explain-per-std",
                        help="Saliency and SmoothGrad are gradients: per unit of each raw feature, so a feature "
                             "measured in small numbers ranks first whatever its importance. Times each feature's "
                             "standard deviation, they compare the features on one scale. The other methods are "
                             "in the score's own units already.")
    if uneven and not per_std:
        st.warning("The features' scales differ more than 100-fold: raw gradients rank the small-scale features "
                   "first. Turn on per standard deviation to compare them.", icon=":material/straighten:")
if task.per_label:  # a map per label: the wrong ones first, then those present or predicted
    p_row = np.asarray(run.probs[row], dtype=np.float64)
    truth_row = np.asarray(run.labels[row])
    said = p_row >= task.threshold
    order = sorted(range(len(run.class_names)), key=lambda k: (said[k] == truth_row[k], -p_row[k]))
    targets = [(k, f"label {run.class_names[k]}: p = {p_row[k]:.2f}, "
                   f"{'present' if truth_row[k] else 'absent'}{'' if said[k] == truth_row[k] else ' — wrong'}")
               for k in order if truth_row[k] or said[k]][:3] or [(order[0], f"label {run.class_names[order[0]]}")]
elif task.has_classes:
    targets = [("pred", f"predicted class: {components.class_name(run, pred)}")]
    if label != pred:
        targets.append(("label", f"true class: {components.class_name(run, label)}"))
else:
    targets = [("pred", "the predicted value")]


# a regression's scores are in units of its value's distance from the baseline's (analyzers' perturbation module)
_OF_VALUE = not task.has_classes and not task.per_label
_START = "of the starting value's distance from the baseline" if _OF_VALUE else "of the starting probability"


def _scores_text(scores: dict, method: str) -> str:
    """The perturbation scores in a line, the headline first: against a random order of the same sample, so a target
    the model gives a low probability cannot look faithful (issue 16)."""
    def number(name):
        value = scores.get(name)
        return None if value is None or not np.isfinite(value) else value

    parts = []
    if number("deletion_vs_random") is not None:
        parts.append(f"deletion vs a random order **{scores['deletion_vs_random']:+.2f}** {_START} "
                     f"(0: no better than chance; higher is better)")
    if number("deletion_auc") is not None:
        relative = number("deletion_auc_norm")
        raw = f"{scores['deletion_auc']:.4g} (the mean predicted value)" if _OF_VALUE else \
            f"{scores['deletion_auc']:.3f}"
        parts.append(f"deletion AUC {raw}" + (f", {relative:.2f} {_START}" if relative is not None else "") +
                     " (lower is better)")
    if number("insertion_auc") is not None:
        relative = number("insertion_auc_norm")
        raw = f"{scores['insertion_auc']:.4g}" if _OF_VALUE else f"{scores['insertion_auc']:.3f}"
        parts.append(f"insertion AUC {raw}" +
                     (f", {relative:.2f} of the way from the baseline to the input" if relative is not None else "")
                     + " (higher is better)")
    if number("road_gap") is not None:
        parts.append(f"ROAD (removed positions imputed from their neighbours): most relevant first "
                     f"{scores['road_morf_auc']:.2f}, least relevant first {scores['road_lerf_auc']:.2f}, gap "
                     f"**{scores['road_gap']:+.2f}** (higher is better)")
    if method in COMPLETE_METHODS and number("completeness_gap") is not None:
        parts.append(f"completeness gap **{components.percent(scores['completeness_gap'])}** ({_SUMS_TO[method]})")
    if scores.get("mass_inside") is not None:
        parts.append(f"attribution inside the planted ground truth **{components.percent(scores['mass_inside'])}**")
    return " · ".join(parts)


def _verdict_numbers(mean: float, low, high, samples, randomisations) -> str:
    interval = f" (95% CI {low:.2f}–{high:.2f})" if low is not None and high is not None else ""
    models = int(randomisations or 1)
    return (f"mean |ρ| {mean:.2f}{interval} against the threshold {SANITY_THRESHOLD:.2f}, over "
            f"{int(samples or 0)} fixed probe samples" +
            (f" and {models} independently randomised models" if models > 1 else ""))


def _sanity_badge(scores: dict) -> None:
    if scores.get("degenerate"):
        # a finding about the map, not a failure: Grad-CAM keeps positive evidence only, and a class or label the
        # model rules out often has none
        st.warning("Degenerate map: it is the same everywhere (or zero), so it ranks nothing. It gets no "
                   "faithfulness score and fails the sanity check. For Grad-CAM, choose a layer whose output has more "
                   "than one position; a class or label the model rules out often has no positive evidence to show.",
                   icon=":material/block:")
        return
    flag, mean = scores.get("sanity_flag"), scores.get("sanity_mean_corr")
    if flag is None or mean is None:
        return
    numbers = _verdict_numbers(mean, scores.get("sanity_ci_low"), scores.get("sanity_ci_high"),
                               scores.get("sanity_samples"), scores.get("sanity_randomisations"))
    own = scores.get("sanity_rank_corr")
    numbers += f"; this sample's ρ {own:.2f}" if own is not None else ""
    what = "Rank correlation of |map| with the map of the fully randomised model"
    if flag:
        st.warning(f"Sanity check failed: the maps barely change when the model is randomised. {what}: {numbers}. "
                   f"They do not reflect what the model learned.", icon=":material/warning:")
    elif scores.get("sanity_inconclusive"):
        st.info(f"Sanity check inconclusive: the interval straddles the threshold. {what}: {numbers}.",
                icon=":material/help:")
    else:
        st.success(f"Sanity check passed: randomising the model changes the maps. {what}: {numbers}.",
                   icon=":material/check_circle:")
    beside = []
    if scores.get("sanity_smooth_corr") is not None:
        beside.append(f"sMPRT (maps averaged over {SMOOTH_SAMPLES} noisy copies): mean |ρ| "
                      f"{scores['sanity_smooth_corr']:.2f}")
    if scores.get("sanity_complexity_rise") is not None:
        rise = scores["sanity_complexity_rise"]
        beside.append(f"eMPRT: the map's entropy {'rises' if rise > 0 else 'does not rise'} "
                      f"({rise:+.0%}) when the model is randomised")
    if beside:
        st.caption(" · ".join(beside) + " (Hedström et al., 2023).")


def _controls_caption() -> None:
    """What passing and failing look like: the controls' verdicts on the same probe samples."""
    try:
        controls = sanity_controls(run, model=model, dataset=dataset)
    except AnalyzerError as exc:
        st.caption(f"The sanity check's controls could not be computed: {md(exc)}")
        return
    words = {"control_random": "a random map", "control_edges": "an edge detector of the input (it reads no model)"}
    parts = []
    for name, numbers in controls.items():
        outcome = "fails" if numbers["flag"] else "is inconclusive" if numbers["inconclusive"] else "passes"
        parts.append(f"{words[name]} {outcome} (mean |ρ| {numbers['mean_corr']:.2f})")
    st.caption("Controls on the same probe samples: " + "; ".join(parts) + ". Passing is necessary, not "
               "sufficient: a random map passes too.")


def _draw(explanation, method: str, title: str, key: str) -> None:
    signed = METHODS[method].signed
    values = None
    if modality == "tabular" and per_std and METHODS[method].per_input_unit:
        values = per_standard_deviation(explanation.display[None], dataset.x)[0]
        title = f"{title} (per standard deviation)"
    fig = sample_display.attribution_figure(run, x, explanation.display, signed=signed, title=title, truth=truth,
                                            picture=_picture(x) if modality == "image" else None,
                                            feature_values=values)
    st.plotly_chart(fig, key=key, config={"displayModeBar": False})
    attribution = np.asarray(explanation.attribution)
    if multispectral and np.isfinite(attribution).all():  # which bands the map rests on
        from analyzers.explanations.bands import band_shares

        shares = band_shares(attribution[None], band_names).mean
        if not np.isfinite(shares).all() or np.ptp(shares) < 1e-9:
            st.caption("Every band has the same share of this map: the method does not tell bands apart.")
        else:
            st.caption(f"Share of |map| per band: {md(figures.band_shares_text(band_names, shares))}")


if truth is not None and modality in ("image", "sequence"):
    st.caption("This dataset plants the evidence for its class: it is outlined (dotted) on the maps of images and "
               "framed (dotted) in bold letters on sequences. A faithful map concentrates there.")
# Every map is drawn first, then the scores fill in below them: a person looks at the maps while the deletion
# curves and the sanity check (the slower part) are computed.
pending = []
for method in methods:
    st.markdown(f"#### {METHODS[method].label}")
    st.caption(METHODS[method].description)
    # sequences are read along a line: one full-width map per target; images and bars side by side
    cols = [st.container() for _ in targets] if modality in ("sequence", "tokens") else st.columns(len(targets))
    if method == "gradcam" and gradcam_needs_layer:
        st.info("Grad-CAM on a token model works on one layer's tokens: choose that layer above.")
        continue
    for col, (target, target_title) in zip(cols, targets):
        with col:
            options = {"layer": layer} if method == "gradcam" and layer else {}
            try:
                with st.spinner(f"{METHODS[method].label} for the {md(target_title)}…"):
                    explanation = sample_map(run, sample["id"], method, target=target, model=model, dataset=dataset,
                                             **options)
            except AnalyzerError as exc:
                st.error(md(exc))
                continue
            _draw(explanation, method, target_title, key=f"map-{method}-{target}")
            st.caption(f"Settings: {md(describe_settings(method, explanation.settings))}")
            slot = st.empty()
            slot.caption("Scores: computing…")
            pending.append((explanation, options, slot))
for explanation, options, slot in pending:
    try:
        scores = sample_scores(run, explanation, model=model, dataset=dataset, sanity=sanity, **options)
    except AnalyzerError as exc:
        slot.error(md(exc))
        continue
    with slot.container():
        st.markdown(_scores_text(scores, explanation.method))
        _sanity_badge(scores)
if sanity and pending:
    _controls_caption()

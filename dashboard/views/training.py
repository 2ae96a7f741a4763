"""Training and gradients: training curves, per-layer gradient norms with flags, dead units, overfit-one-batch."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError
from dashboard import components, data, figures, summaries
from dashboard.text import md

run = components.require_run(tasks=(*components.CLASS_TASKS, "regression"))  # gradients read the loss
components.header("Training & gradients", run)

# ---------------------------------------------------------------------------------------------- training log
st.subheader("Training curves")
try:
    log = data.training_log(run)
except AnalyzerError as exc:
    st.error(md(exc))
    log = None
if log is None:
    components.not_in_run("A training log", "Add `analyzers.TrainingRecorder` to your training loop (a few lines, "
                                           "see the README) and put its file at training/log.jsonl in the run.")
else:
    steps, validation, grad_norms = log
    st.plotly_chart(figures.training_curves_figure(steps, validation), key="training-curves",
                    config={"displayModeBar": False})
    if not validation.empty and "val_accuracy" in validation:
        last = validation.iloc[-1]
        st.caption(f"Last validation: loss {last['val_loss']:.4f}, accuracy {last['val_accuracy']:.3f} at step "
                   f"{int(last['step'])}.")
    if not grad_norms.empty:
        st.plotly_chart(figures.grad_norm_figure(grad_norms, x="step", title="Gradient norm per layer during training"),
                        key="training-grad-norms", config={"displayModeBar": False})

# ------------------------------------------------------------------------------------------ gradient traces
st.subheader("Gradients on the loaded data")
traces = data.optional_table(run, "gradients/traces.parquet")
flags = data.optional_json(run, "gradients/flags.json") or {}
if traces is None:
    components.not_in_run("The gradient analysis", "Run python -m analyzers run with the gradients stage.", run=run,
                          stage="gradients")
else:
    vanishing, exploding = flags.get("vanishing", []), flags.get("exploding", [])
    if vanishing or exploding:
        st.warning(" · ".join([f"**{md(layer)}**: vanishing gradients" for layer in vanishing] +
                              [f"**{md(layer)}**: exploding gradients" for layer in exploding]),
                   icon=":material/warning:")
    else:
        thresholds = flags.get("thresholds", {})
        st.success(f"No vanishing or exploding layer: every layer's median gradient / weight norm ratio lies between "
                   f"{thresholds.get('vanishing_ratio', 'the')} and {thresholds.get('exploding_ratio', 'thresholds')}.",
                   icon=":material/check_circle:")
    params = flags.get("params", {})
    if params:
        seconds = (flags.get("timings_s") or {}).get("total")
        partial = params.get("dropped_partial_batch")
        st.caption(f"Gradients of the loss over {params.get('num_batches', '?')} batches of "
                   f"{params.get('batch_size', '?')} samples, model in eval mode"
                   + (f"; computed in {seconds:.1f} s" if isinstance(seconds, (int, float)) else "")
                   + (f"; a last batch of only {partial} samples was left out, its gradients being of another "
                      f"scale." if partial else "."))
    layer_flags = summaries.layer_flags(flags)
    kind = st.segmented_control("Gradients of", ["parameters", "activations"], default="parameters",
                                key="grad-kind") or "parameters"
    wide = summaries.gradient_traces(traces, kind)
    if wide.empty:
        st.info(f"No {kind} gradients were traced.")
    else:
        st.plotly_chart(figures.grad_norm_figure(wide, x="batch", flags=layer_flags,
                                                 title=f"Gradient norm of the {kind} per layer, batch by batch"),
                        key="grad-traces", config={"displayModeBar": False})
    if flags.get("inplace_activations"):
        st.caption(f"In-place activations: {', '.join(map(md, flags['inplace_activations']))}. Activations were captured as "
                   f"{flags.get('activation_capture', 'each layer output')}.")

    dead = data.optional_table(run, "gradients/dead_units.parquet")
    if dead is not None and len(dead) and not (dead["dead_fraction"] > 0).any():
        st.subheader("Dead units")
        # an all-zero bar chart is an empty frame (its axis ran from -100% to 100%): say what it would have shown
        st.success(f"No dead units: every unit of the {len(dead)} ReLU layer{'s' if len(dead) > 1 else ''} "
                   f"({', '.join(map(md, dead['layer']))}) was active on some traced sample.",
                   icon=":material/check_circle:")
    elif dead is not None and not len(dead):
        st.caption("Dead units: the model has no ReLU layer, so none can be dead.")
    elif dead is not None:
        st.subheader("Dead units")
        st.caption("Share of each ReLU layer's units that are never active on the loaded data.")
        st.plotly_chart(figures.dead_units_figure(dead),
                        key="dead-units", config={"displayModeBar": False})

# ------------------------------------------------------------------------------------------- overfit one batch
st.subheader("Can the model overfit one batch?")
st.caption("Trains a freshly initialised copy of the model on one batch for a few hundred steps: a model that "
           "cannot drive that loss towards zero has a bug in its wiring, loss or labels. The loaded model is not "
           "touched. Training stops at the time limit, and is judged on the loss it reached.")
cols = st.columns([1, 1, 1, 1, 2], vertical_alignment="bottom")
steps_n = cols[0].number_input("Steps", 10, 2000, 200, step=50, key="overfit-steps")
batch = cols[1].number_input("Batch size", 2, 256, 32, key="overfit-batch")
lr = cols[2].number_input("Learning rate", 1e-5, 1.0, 3e-3, format="%.4f", key="overfit-lr")
limit = cols[3].number_input("Time limit (s)", 1, 600, 10, key="overfit-limit")
if cols[4].button("Run the check", key="overfit-run", type="primary"):
    try:
        with components.progress_bar("Training a copy of the model on one batch…", lambda done, total:
                                     f"Training a copy on one batch: step {done} of {total}") as on_step:
            result = data.overfit(run, int(steps_n), int(batch), float(lr), float(limit), _on_step=on_step)
        st.session_state["overfit-result"] = (run.path.name, result)
    except AnalyzerError as exc:
        st.error(md(exc))
stored = st.session_state.get("overfit-result")
if stored and stored[0] == run.path.name:
    result = stored[1]
    if not result.judged:
        st.warning(result.message[:1].upper() + result.message[1:] + ".", icon=":material/timer:")
    else:
        (st.success if result.passed else st.error)(("Passed: " if result.passed else "Failed: ") + result.message)
    curve = pd.DataFrame({"step": np.arange(len(result.losses)), "loss": result.losses})
    st.plotly_chart(figures.training_curves_figure(curve, pd.DataFrame()), key="overfit-curve",
                    config={"displayModeBar": False})

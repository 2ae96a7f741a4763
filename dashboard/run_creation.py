"""Creating a run from the dashboard: the analysis with one progress bar per stage, its errors as one line, and the
built-in samples offered as one-click runs where there is no run yet (`offer_samples`). The Load page and the pages'
empty state (`components.require_run`) create runs through these alone."""
from __future__ import annotations

import logging

import streamlit as st

from analyzers.errors import AnalyzerError, RunExists
from dashboard import access, data, state
from dashboard.text import in_page_words, md

LOG = logging.getLogger(__name__)
REPLACE_LABEL = "Replace a run of this name"
# the Load page's controls for the flags a message about a run's name speaks of (`text.in_page_words`)
NAME_CONTROLS = {"--overwrite": REPLACE_LABEL, "--out": "Run name"}
STAGE_LABELS = {"load": "Loading the model and data", "inference": "Running the model",
                "evaluation": "Metrics, slices and label noise", "projections": "Embedding projections",
                "gradients": "Gradient traces"}
READY_KEY = "load-ready"  # the name of a run just made, which the Load page announces once


def run_with_progress(model_spec: str, data_spec: str, name: str, *, arch=None, overwrite=False,
                      announce: bool = True, **options) -> None:
    """run_analysis into the runs directory with one progress bar per stage; the run is then opened (and, with
    `announce`, the Load page says it is ready) and the script reruns, so the sidebar's run picker shows it."""
    from analyzers.engines.pipeline import run_analysis

    stages = ["load", "inference", *data.available_stages()]
    bars = {stage: st.progress(0.0, text=STAGE_LABELS.get(stage, stage)) for stage in stages}

    def report(stage: str, fraction: float) -> None:
        if stage == "done":
            for other, bar in bars.items():
                bar.progress(1.0, text=f"{STAGE_LABELS.get(other, other)} — done")
            return
        bar = bars.get(stage)
        if bar is not None:
            bar.progress(min(max(float(fraction), 0.0), 1.0), text=STAGE_LABELS.get(stage, stage))
        for earlier in stages[:stages.index(stage)] if stage in stages else []:
            bars[earlier].progress(1.0, text=f"{STAGE_LABELS.get(earlier, earlier)} — done")

    out = data.settings().runs_dir / name
    try:
        run_analysis(model_spec, data_spec, out, arch=arch, overwrite=overwrite, analyses=data.available_stages(),
                     report=report, owner=access.current_user(), **options)
    except BaseException as exc:  # no progress bar stays above the error line, half-filled or empty
        for bar in bars.values():
            bar.empty()
        if not isinstance(exc, RunExists):
            raise
        # nothing was replaced: say so in this page's words, not the command line's
        raise AnalyzerError(f"A run called {name} already exists, made from another model, dataset or parameters, "
                            f"and it was left as it is: choose another run name, or tick “{REPLACE_LABEL}”") from None
    data.forget_runs()
    state.put("run", name)
    state.put("sample", None)
    state.set_selection(None)
    if announce:
        st.session_state[READY_KEY] = name
    st.rerun()


def check_name_is_ours(name: str) -> None:
    """With sign-in on, a name that another person's run (or the operator's) holds is refused before anything runs:
    that run is neither replaced nor reused."""
    existing = data.stored_runs().get(name)
    if existing is not None and not access.may_change(data.run_owner(existing)):
        raise AnalyzerError(access.change_refusal(name, data.run_owner(existing)))


def guarded(action, *, controls: dict = NAME_CONTROLS) -> None:
    """Run `action`, turning any failure into one readable line (never a traceback on the page); `controls` maps
    the command line's flags that a message may name to the labels of the Load page's controls."""
    try:
        action()
    except AnalyzerError as exc:
        st.error(md(in_page_words(exc, controls)))
    except Exception as exc:  # a failure we did not foresee: say what it was, keep the app alive, log the details
        LOG.exception("analysis failed")
        st.error(f"The analysis failed: {md(data.error_message(exc))}")


def sample_run_name(sample: str) -> str:
    """The default name of a built-in sample's run: the signed-in person's tag added, so colleagues' do not
    collide."""
    return f"sample-{sample}{access.name_suffix()}"


def offer_samples() -> None:
    """The built-in samples as one button each, with what the sample plants: one click analyses it (as the Load
    page's Run does, under its default name) and opens it."""
    from sample_models import SAMPLE_NAMES, get_sample

    ready = [get_sample(n) for n in SAMPLE_NAMES if get_sample(n).weights_path.exists()]
    if not ready:
        return
    st.subheader("Or start with a built-in sample")
    st.caption(f"Each is a small trained model with its own data and a problem planted in it to find. One click "
               f"analyses it here (seconds to a minute) as the run sample-NAME{md(access.name_suffix())} and opens "
               f"it; to give it another name, use the Load page.")
    clicked = None
    for sample in ready:
        cols = st.columns([1, 5], vertical_alignment="center")
        if cols[0].button(sample.name, key=f"offer-sample-{sample.name}", width="stretch"):
            clicked = sample.name
        cols[1].markdown(md(sample.summary))
    if clicked is not None:
        name = sample_run_name(clicked)

        def _sample() -> None:
            check_name_is_ours(name)
            # never replaces: a run of this name from the same files reopens, one from others is refused in one line
            run_with_progress(f"sample:{clicked}", f"sample:{clicked}", name, announce=False)

        guarded(_sample)

"""Load: analyse a built-in sample or uploaded files (progress per stage), and browse, search and delete runs."""
from __future__ import annotations

import re
from datetime import datetime

import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError
from dashboard import access, components, data, state
from dashboard.run_creation import (NAME_CONTROLS, READY_KEY, REPLACE_LABEL, check_name_is_ours, guarded,
                                    run_with_progress, sample_run_name)
from dashboard.text import md

MODEL_TYPES = ["pt2", "safetensors", "pt", "pth", "ckpt"]
DATA_TYPES = ["npz", "csv", "parquet", "zip"]
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
ARCH_LABEL = "Architecture (state dicts only)"
CLASS_NAMES_LABEL = "Class names (the model's output order)"
# what a message from the analyzers calls a command-line flag, this page calls by its control's label
CONTROLS = {"--arch": ARCH_LABEL, "--label-column": "Label column (tables)", "--id-column": "Id column (tables)",
            "--class-names": CLASS_NAMES_LABEL, "--image-size": "Image size H,W", "--mean": "Mean per channel",
            "--std": "Std per channel", **NAME_CONTROLS}
TASK_CHOICES = {"auto": "automatic (from the labels and the model)", "classification": "classification",
                "binary": "binary classification", "multilabel": "multi-label (several yes/no labels)",
                "regression": "regression"}
REPLACE_HELP = ("Without it, an existing run of this name is never replaced (the same model, data and settings "
                "just reopen it). A replaced run keeps its explanations and t-SNE/UMAP projections when the model "
                "and data are the same files.")

settings = data.settings()
st.title("Load")
st.caption(f"Runs are stored in {md(settings.runs_dir)}; uploads in {md(settings.workspace)}.")
ready_run = st.session_state.pop(READY_KEY, None)
if ready_run:
    st.success(f"Run **{md(ready_run)}** is ready.")
    components.page_link("overview", "Open its overview", run=ready_run)
analyse_tab, runs_tab = st.tabs(["Analyse a model", "Stored runs"])


def _numbers(text: str, kind, label: str):
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [kind(part) for part in re.split(r"[,x ]+", text) if part]
    except ValueError:
        raise AnalyzerError(f"{label} must be numbers separated by commas, such as 0.5,0.5,0.5; got {text!r}")


with analyse_tab:
    from sample_models import SAMPLE_NAMES, get_sample

    source = st.segmented_control("Model and data", ["Built-in sample", "Upload files"], default="Built-in sample",
                                  key="load-source") or "Built-in sample"
    if source == "Built-in sample":
        ready = [n for n in SAMPLE_NAMES if get_sample(n).weights_path.exists()]
        cols = st.columns([2, 2, 1], vertical_alignment="bottom")
        sample = cols[0].selectbox("Sample", ready, key="load-sample",
                                   help="Small trained models with their own data: digits (8×8 images), tabular "
                                        "(breast cancer), dna (sequences with planted motifs), shapes (images with "
                                        "a spurious colour cue).")
        # one name field per sample: the name follows the picker (a shared field kept "sample-digits" for dna)
        name = cols[1].text_input("Run name", value=sample_run_name(sample),
                                  key=f"load-sample-name-{sample}")
        replace_sample = cols[2].checkbox(REPLACE_LABEL, key="load-sample-overwrite", help=REPLACE_HELP)
        if st.button("Run", type="primary", key="load-run-sample"):
            if not RUN_NAME.match(name or ""):
                st.error("The run name may hold letters, digits, '.', '_' and '-' (at most 80), starting with a "
                         "letter or digit.")
            else:
                def _sample() -> None:
                    check_name_is_ours(name)
                    run_with_progress(f"sample:{sample}", f"sample:{sample}", name, overwrite=replace_sample)

                guarded(_sample, controls=CONTROLS)
    else:
        left, right = st.columns(2, gap="large")
        with left:
            model_file = st.file_uploader("Model", type=MODEL_TYPES, key="load-model-file",
                                          help="A torch.export program (.pt2), or a state dict (.safetensors, or "
                                               ".pt/.pth read without unpickling code) with a sample architecture.")
            arch = st.selectbox(ARCH_LABEL, ["—", *SAMPLE_NAMES], key="load-arch")
            class_names_text = st.text_input(CLASS_NAMES_LABEL, key="load-class-names", placeholder="cat,dog,...",
                                             help="For a model that knows its classes only by index: text labels "
                                                  "and class folders are then matched to these names.")
        with right:
            data_file = st.file_uploader("Dataset", type=DATA_TYPES, key="load-data-file",
                                         help=".npz with arrays x and y (and optionally ids), .csv/.parquet with a "
                                              "label column, or a .zip of image folders (one folder per class).")
            label_column = st.text_input("Label column (tables)", value="label", key="load-label",
                                         help="The column holding each row's label. Several columns separated by "
                                              "commas (e.g. circle,square,triangle), each holding 0/1, make a "
                                              "multi-label dataset: one label per column, in the model's output "
                                              "order.")
            id_column = st.text_input("Id column (tables)", key="load-id-column", placeholder="none: row numbers",
                                      help="A column naming each sample: its values become the ids you search "
                                           "and go to; it is not used as a feature or a group.")
            task_choice = st.selectbox(
                "Task", list(TASK_CHOICES), key="load-task", format_func=TASK_CHOICES.get,
                help="What the model does. Automatic reads it from the labels and the model's output: whole-number "
                     "labels with one output per class are classes, real-valued targets with one output a "
                     "regression; when both readings fit, it asks.")
        with st.expander("Image preprocessing (image-folder zips)"):
            cols = st.columns(3)
            size_text = cols[0].text_input("Image size H,W", placeholder="from the model", key="load-size")
            mean_text = cols[1].text_input("Mean per channel", placeholder="0.5,0.5,0.5", key="load-mean")
            std_text = cols[2].text_input("Std per channel", placeholder="0.25,0.25,0.25", key="load-std")
            st.caption("Pixels are scaled to [0, 1], resized, then (x − mean) / std per channel.")
        cols = st.columns([2, 1], vertical_alignment="bottom")
        default_name = f"upload-{datetime.now():%Y%m%d-%H%M%S}{access.name_suffix()}"
        name = cols[0].text_input("Run name", value=st.session_state.get("load-upload-default", default_name),
                                  key="load-upload-name")
        overwrite = cols[1].checkbox(REPLACE_LABEL, key="load-overwrite", help=REPLACE_HELP)
        if st.button("Run", type="primary", key="load-run-upload"):
            def _upload() -> None:
                if model_file is None or data_file is None:
                    raise AnalyzerError("choose both a model file and a dataset file, then press Run")
                if not RUN_NAME.match(name or ""):
                    raise AnalyzerError("the run name may hold letters, digits, '.', '_' and '-' (at most 80), "
                                        "starting with a letter or digit")
                check_name_is_ours(name)
                size = _numbers(size_text, int, "Image size")
                if size is not None and len(size) != 2:
                    raise AnalyzerError(f"image size must be two numbers H,W, got {size_text!r}")
                class_names = [c.strip() for c in (class_names_text or "").split(",") if c.strip()] or None
                options = dict(image_size=tuple(size) if size else None, mean=_numbers(mean_text, float, "Mean"),
                               std=_numbers(std_text, float, "Std"), label_column=label_column or "label",
                               id_column=(id_column or "").strip() or None, class_names=class_names,
                               task=None if task_choice == "auto" else task_choice)
                from analyzers.loading.workspace import Workspace

                workspace = Workspace(settings.workspace, max_bytes=settings.max_upload_bytes)
                model_path = workspace.store(model_file.name, model_file.getvalue())
                data_path = workspace.store(data_file.name, data_file.getvalue())
                try:
                    run_with_progress(str(model_path), str(data_path), name, arch=None if arch == "—" else arch,
                                      file_names={"model": model_file.name, "dataset": data_file.name},
                                      overwrite=overwrite, **options)
                except AnalyzerError as exc:  # name the files as the person called them, not as stored
                    raise AnalyzerError(str(exc).replace(str(model_path), model_file.name)
                                        .replace(model_path.name, model_file.name)
                                        .replace(str(data_path), data_file.name)
                                        .replace(data_path.name, data_file.name)) from exc

            guarded(_upload, controls=CONTROLS)

with runs_tab:
    runs = data.known_runs()
    if not runs:
        st.info("No stored runs yet.")
    else:
        rows = []
        for run_name, path in runs.items():
            info, problem = data.run_status(path)
            owner = data.run_owner(path)
            owner_name = (owner or {}).get("name") or "operator (command line)"
            if problem is not None:  # listed with its reason; it can still be deleted
                rows.append({"run": run_name, "status": "damaged", "owner": owner_name, "created": "", "model": "",
                             "data": "", "samples": None, "accuracy": None, "problem": problem})
                continue
            rows.append({"run": run_name, "status": "ok", "owner": owner_name,
                         "created": info.get("created", "").replace("T", " ")[:16],
                         "model": components.file_label(info, "model"),
                         "data": components.file_label(info, "dataset"),
                         "samples": info.get("num_samples"), "accuracy": info.get("accuracy"), "problem": ""})
        table = pd.DataFrame(rows)
        if not access.enabled():
            table = table.drop(columns=["owner"])
        if not table["problem"].astype(bool).any():
            table = table.drop(columns=["status", "problem"])
        else:
            st.warning(f"{md((table['status'] == 'damaged').sum())} stored run(s) are damaged: their pages show why. "
                     f"Rebuild one with python -m analyzers run --overwrite, or delete it here.")
        picked = st.dataframe(table, hide_index=True, on_select="rerun", selection_mode="single-row", key="runs-table",
                              column_config={"accuracy": st.column_config.NumberColumn(format="%.3f")})
        # a selection outlives a deletion (the table is shorter on the rerun that follows): a stale row picks nothing
        rows_picked = [r for r in picked.selection.rows if 0 <= r < len(table)]
        chosen = table["run"].iloc[rows_picked[0]] if rows_picked else None
        if chosen:
            cols = st.columns([1, 1, 3], vertical_alignment="center")
            if cols[0].button(f"Open {chosen}", type="primary", key="runs-open"):
                state.put("run", chosen)
                state.put("sample", None)
                state.set_selection(None)
                components.go_to("overview")
            owner = data.run_owner(runs[chosen])
            if not access.may_change(owner):
                cols[2].caption(md(access.change_refusal(chosen, owner).split(":")[0]) + ".")
                confirm = False
            else:
                confirm = cols[2].checkbox(f"Yes, delete {md(chosen)} and its files", key=f"runs-confirm-{chosen}")
            if cols[1].button("Delete", key="runs-delete", disabled=not confirm):
                from analyzers.loading.runs import delete_run

                try:
                    if not access.may_change(owner):  # checked again here: a disabled button is only a hint
                        raise AnalyzerError(access.change_refusal(chosen, owner))
                    delete_run(runs[chosen])
                    data.forget_runs()
                    if state.get("run") == chosen:
                        state.put("run", None)
                    st.success(f"Deleted {md(chosen)}.")
                    st.rerun()
                except AnalyzerError as exc:
                    st.error(md(exc))
        st.divider()
        query = st.text_input("Find a sample id in the stored runs", key="runs-search", placeholder="sample id")
        if query:
            hits = [n for n, p in data.usable_runs().items() if data.run_has_sample(data.load_run(p), query.strip())]
            if not hits:
                st.info(f"No stored run holds a sample with id {md(repr(query))}.")
            for hit in hits:
                components.page_link("explain", f"Sample {md(query)} in {md(hit)}", run=hit, sample=query.strip())

"""Overview: headline metrics, per-class table, class balance, reliability diagram, and the top findings."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import components, data, figures

run = components.require_run()
components.header("Overview", run)
m = data.metrics(run)

cols = st.columns(5)
cols[0].metric("Accuracy", f"{m['accuracy']:.3f}")
cols[1].metric("Balanced accuracy", f"{m['balanced_accuracy']:.3f}")
cols[2].metric("Log loss", f"{m['log_loss']:.3f}")
auc = m.get("roc_auc_ovr")
cols[3].metric("ROC AUC (one-vs-rest)", "—" if auc is None else f"{auc:.3f}")
cols[4].metric("Calibration error (ECE)", f"{m['ece']:.3f}")

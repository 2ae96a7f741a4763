"""load page."""
import streamlit as st

from dashboard import components

run = components.require_run()
components.header("load", run)
st.info("This page is being built.")

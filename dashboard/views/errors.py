"""errors page."""
import streamlit as st

from dashboard import components

run = components.require_run()
components.header("errors", run)
st.info("This page is being built.")

"""Streamlit front end: `streamlit run dashboard/app.py -- --runs-dir runs --run runs/NAME`.

`figures` and `selection` are plain Python (no Streamlit) so reports and tests reuse them; every number shown comes
from `analyzers` functions or the run directory.
"""

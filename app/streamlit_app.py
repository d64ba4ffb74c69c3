"""The blossom web app: `streamlit run app/streamlit_app.py` (or `blossom app`). The page lives in blossom.webapp."""

from blossom.webapp import main

main()

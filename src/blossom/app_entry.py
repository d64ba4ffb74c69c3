"""The script Streamlit runs for `blossom app` (Streamlit runs a file, not a module)."""

from blossom.webapp import main

main()

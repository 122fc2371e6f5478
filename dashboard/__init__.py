"""The Streamlit dashboard: watch and steer runs through the server's public API only."""

"""Where the dashboard keeps its state: the server it talks to, the token, the chosen run, and the client."""

from __future__ import annotations

import argparse
import os
import re
import sys

import streamlit as st

from dashboard.books import AlertBook, CommandBook
from dashboard.series import RunSeries
from protocols.client import Client

DEFAULT_SERVER = "http://127.0.0.1:8765"


def configured_server(argv: list[str]) -> str:
    """The server URL from the app's arguments (`-- --server URL`), RUNSTEER_SERVER, or the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--server", default=os.environ.get("RUNSTEER_SERVER", DEFAULT_SERVER))
    known, _ = parser.parse_known_args(argv)
    server: str = known.server
    return server


def default_user() -> str:
    """A source name for this person: $USER with only the characters a source allows."""
    return re.sub(r"[^A-Za-z0-9_.@-]", "", os.environ.get("USER", "")) or "dashboard"


def init_state() -> None:
    """Fill `st.session_state` with every key the pages use, once per browser session."""
    state = st.session_state
    state.setdefault("server", configured_server(sys.argv[1:]))
    state.setdefault("token", os.environ.get("RUNSTEER_TOKEN", ""))
    state.setdefault("user", default_user())
    state.setdefault("run_id", None)
    state.setdefault("series", {})
    state.setdefault("books", {})
    state.setdefault("alerts", {})
    state.setdefault("tracked", [])
    state.setdefault("confirm_stop", False)
    state.setdefault("dismissed_alert", 0)
    state.setdefault("needs_token", False)


@st.cache_resource(show_spinner=False)
def _client(server: str, token: str) -> Client:
    return Client(server, token=token or None)


def client() -> Client:
    """The shared client for this session's server and token (one keep-alive connection per pair)."""
    return _client(st.session_state["server"], st.session_state["token"])


def source() -> str:
    """The source this person's commands carry: `user:<name>` (a token's name when the server needs one)."""
    return f"user:{st.session_state['user']}"


def run_series(run_id: str) -> RunSeries:
    """The chart history of a run held by this session."""
    series: dict[str, RunSeries] = st.session_state["series"]
    return series.setdefault(run_id, RunSeries())


def command_book(run_id: str) -> CommandBook:
    """The command records of a run held by this session."""
    books: dict[str, CommandBook] = st.session_state["books"]
    return books.setdefault(run_id, CommandBook())


def alert_book(run_id: str) -> AlertBook:
    """The alerts of a run held by this session."""
    alerts: dict[str, AlertBook] = st.session_state["alerts"]
    return alerts.setdefault(run_id, AlertBook())

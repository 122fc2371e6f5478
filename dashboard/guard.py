"""Turning the client's errors into clear messages, asking for a token, and recovering when the server returns."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st

from dashboard.session import client
from protocols.errors import NotFound, RequestRejected, RunsteerError, ServerUnavailable, Unauthorized

RETRY_S = 2.0
"""How often a page that lost the server checks whether it is back."""

OFFLINE = (ServerUnavailable, OSError)
"""What a call to a server that is down raises (the client lets a refused connection through as OSError)."""


@contextmanager
def guarded(*, recover: bool = True) -> Iterator[None]:
    """Run a block of page code; a client error becomes a message instead of a traceback.

    With `recover`, a lost server starts a small fragment that reruns the whole page once it answers again;
    fragments that refresh themselves pass `recover=False`.
    """
    try:
        yield
    except OFFLINE as exc:
        st.error(
            f"The control server at {st.session_state['server']} is not answering ({exc}). "
            f"This page retries every {RETRY_S:g} s and recovers by itself.",
            icon=":material/cloud_off:",
        )
        if recover:
            _wait_for_server()
    except Unauthorized as exc:
        st.session_state["needs_token"] = True
        st.warning(
            f"The server refused this request: {exc}. Enter a token in the sidebar (Connection).", icon=":material/key:"
        )
    except NotFound as exc:
        st.warning(
            f"Not found on the server: {exc}. The run may have been removed; pick another in the sidebar.",
            icon=":material/help:",
        )
    except RequestRejected as exc:
        st.error(f"The server refused this: {exc}", icon=":material/block:")
    except RunsteerError as exc:
        st.error(f"Request failed: {exc}", icon=":material/warning:")


@st.fragment(run_every=RETRY_S)
def _wait_for_server() -> None:
    """Rerun the page as soon as the server answers again."""
    try:
        client().list_runs()
    except (RunsteerError, OSError):
        return
    st.rerun()


def connection_form() -> None:
    """The server URL, the token (asked once per session) and the name commands are sent under."""
    with st.expander("Connection", expanded=st.session_state["needs_token"]):
        st.text_input("Server", key="server")
        st.text_input("Token", key="token", type="password", help="Only for servers started with tokens.")
        st.text_input("Your name", key="user", help="Commands go out as user:<name>; with a token, its name.")

"""Dashboard fixtures: a scripted trainer on the test server, and the app under Streamlit's AppTest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from tests.scripted_trainer import ScriptedTrainer

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.fixture
def make_trainer(server_url: str) -> Iterator[Callable[..., ScriptedTrainer]]:
    """Start scripted trainers against the test server; each is stopped at the end of the test."""
    trainers: list[ScriptedTrainer] = []

    def make(**options: Any) -> ScriptedTrainer:
        trainer = ScriptedTrainer(server_url, **options)
        trainer.start()
        trainers.append(trainer)
        return trainer

    yield make
    for trainer in trainers:
        trainer.close()


@pytest.fixture
def trainer(make_trainer: Callable[..., ScriptedTrainer]) -> ScriptedTrainer:
    """One running scripted trainer."""
    return make_trainer()


def open_app(server_url: str, page: str | None = None, **state: Any) -> AppTest:
    """The app pointed at `server_url`, run once (and then on `page`, e.g. `views/control.py`)."""
    app = AppTest.from_file(str(APP), default_timeout=30)
    app.session_state["server"] = server_url
    for key, value in state.items():
        app.session_state[key] = value
    app.run()
    if page is not None:
        app.switch_page(page).run()
    return app

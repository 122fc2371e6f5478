"""End to end: headless Chromium drives `runsteer dashboard` (streamlit run), a real server and a real training run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from protocols.client import Client
from protocols.policy import Policy
from protocols.records import RunInfo

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_http(url: str, timeout_s: float = 60.0) -> None:
    """Poll `url` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.2)


@pytest.fixture
def dashboard(server_url: str, tmp_path: Path) -> Iterator[str]:
    """`runsteer dashboard --server URL --port P` in its own process; yields the dashboard's URL."""
    port = free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "protocols.entry", "dashboard", "--server", server_url, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/_stcore/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.fixture
def training(server_url: str, client: Client, tmp_path: Path) -> Iterator[RunInfo]:
    """`runsteer train` (the built-in tiny GPT on CPU) in its own process; yields its run once registered."""
    log = open(tmp_path / "train.log", "wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "protocols.entry",
            "train",
            "--server",
            server_url,
            "--run-name",
            "demo",
            "--steps",
            "100000",
            "--checkpoint-dir",
            str(tmp_path / "checkpoints"),
            "--quiet",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while not client.list_runs():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.2)
        yield client.list_runs()[0]
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.fixture
def page() -> Iterator[Page]:
    """A page in headless Chromium (Debian's /usr/bin/chromium)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1100})
        context.set_default_timeout(TIMEOUT_MS)
        yield context.new_page()
        context.close()
        browser.close()


def trained_lr(client: Client, run_id: str, step: int) -> float:
    """The learning rate the trainer recorded for `step`, once that step's metrics arrived."""
    deadline = time.monotonic() + 30
    while True:
        series = client.metrics_history(run_id, keys=["lr"], since_step=step).series.get("lr")
        if series and series.steps and series.steps[0] == step:
            return series.values[0]
        assert time.monotonic() < deadline, f"no lr recorded for step {step}"
        time.sleep(0.2)


def open_page(page: Page, title: str, ready: str) -> None:
    """Go to one of the dashboard's pages through the sidebar navigation and wait for the text `ready`."""
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    expect(page.get_by_text(ready).first).to_be_visible()


@pytest.mark.slow
def test_a_person_steers_a_real_training_run_from_the_browser(
    dashboard: str, page: Page, training: RunInfo, client: Client
) -> None:
    """In Chromium: set the lr (the trainer applies it), approve an agent's proposal, see branches, stop the run."""
    run_id = training.run_id
    client.set_policy(run_id, Policy(approval_required=["agent:*"]))
    page.goto(dashboard)
    expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(9)

    open_page(page, "Control", "Hyperparameters")
    page.locator(".st-key-hp_lr input").fill("0.002")
    page.get_by_role("button", name="Apply hyperparameters").click()
    expect(page.get_by_text("applied at step").first).to_be_visible()
    [record] = [r for r in client.list_commands(run_id) if r.command.type == "set_hparams"]
    assert record.status == "applied" and record.effective is not None and record.effective["lr"] == 0.002
    assert record.applied_step is not None
    assert trained_lr(client, run_id, record.applied_step) == pytest.approx(0.002, rel=0.02)

    held = client.submit(
        run_id,
        {"type": "set_hparams", "grad_clip": 0.5},
        source="agent:rules",
        reason="grad_norm spiked 8x over its median; tightening clipping",
    )
    assert held.status == "pending_approval"
    open_page(page, "Commands & agents", "Command history")
    expect(page.get_by_text("tightening clipping").first).to_be_visible()
    page.locator(f".st-key-approve_{held.id} button").click()
    approved = client.wait_for(run_id, held.id, timeout_s=30)
    assert approved.status == "applied" and approved.effective is not None and approved.effective["grad_clip"] == 0.5
    expect(page.get_by_text("grad_clip=0.5").first).to_be_visible()

    deadline = time.monotonic() + 60
    while not client.list_checkpoints(run_id) or client.get_run(run_id).step < 60:
        assert time.monotonic() < deadline, "the run made too little progress"
        time.sleep(0.5)
    first = client.list_checkpoints(run_id)[0]
    client.submit(run_id, {"type": "rollback", "checkpoint_id": first.checkpoint_id, "branch": "retry"}, wait=True)
    time.sleep(4)
    open_page(page, "Health", "branch retry")
    expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(9)
    page.wait_for_timeout(2_500)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "dashboard-health.png")

    open_page(page, "Control", "Hyperparameters")
    page.get_by_role("button", name="Stop…").click()
    expect(page.get_by_text("Stop run demo?")).to_be_visible()
    page.get_by_role("button", name="Yes, stop the run").click()
    expect(page.get_by_text("Run demo finished")).to_be_visible()
    [stop] = [r for r in client.list_commands(run_id) if r.command.type == "stop"]
    assert stop.status == "applied" and client.get_run(run_id).status == "finished"
    page.screenshot(path=ARTIFACTS / "dashboard-control.png", full_page=True)

"""`/metrics` exports each layer's attention logit max and each block's gradient norm, with bounded labels."""

from __future__ import annotations

from control_server.prometheus import MAX_LAYERS
from protocols import MetricsBatch, MetricsSample
from protocols.client import Client
from tests.server.helpers import register
from tests.server.test_prometheus import scrape, value
from tests.serving import ServerThread


def test_per_layer_attention_logits_and_per_block_gradient_norms_are_exported(
    client: Client, server: ServerThread
) -> None:
    """The latest `attn_logit_max/<layer>` and `grad_norm/<block>` appear as labelled gauges of the run's branch."""
    run_id = register(client, "layered")
    values = {"loss": 2.0, "attn_logit_max/0": 31.5, "attn_logit_max/1": 48.0}
    values |= {"grad_norm/embed": 0.2, "grad_norm/block.0": 0.7, "grad_norm/ln_f": 0.01}
    client.push_metrics(run_id, MetricsBatch(samples=[MetricsSample(step=5, time=1.0, values=values)]))
    samples = scrape(server)
    run = {"run_id": run_id, "run_name": "layered", "branch": "main"}
    assert value(samples, "runsteer_attention_logit_max", **run, layer="0") == 31.5
    assert value(samples, "runsteer_attention_logit_max", **run, layer="1") == 48.0
    assert value(samples, "runsteer_block_grad_norm", **run, block="block.0") == 0.7
    assert value(samples, "runsteer_block_grad_norm", **run, block="ln_f") == 0.01


def test_layer_labels_are_capped_per_run_and_odd_names_are_left_out(client: Client, server: ServerThread) -> None:
    """A model reporting more layers than `MAX_LAYERS` exports only that many; a name that is not a plain layer
    name (here with a colon) never becomes a label value."""
    run_id = register(client, "deep")
    values = {f"attn_logit_max/{layer}": float(layer) for layer in range(MAX_LAYERS + 50)}
    values["grad_norm/weird:name"] = 1.0
    client.push_metrics(run_id, MetricsBatch(samples=[MetricsSample(step=1, time=1.0, values=values)]))
    samples = scrape(server)
    layers = [labels for name, labels in samples if name == "runsteer_attention_logit_max"]
    assert len(layers) == MAX_LAYERS
    assert not [labels for name, labels in samples if name == "runsteer_block_grad_norm"]

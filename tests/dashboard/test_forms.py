"""The control page's forms state what the command models state: bounds, defaults and help texts."""

from __future__ import annotations

from pydantic import BaseModel

from protocols.commands import SetHparams, SetOptimizer, SetSchedule
from tests.dashboard.conftest import open_app
from tests.scripted_trainer import ScriptedTrainer

FIELDS: dict[str, tuple[type[BaseModel], str]] = {
    "hp_lr": (SetHparams, "lr"),
    "hp_weight_decay": (SetHparams, "weight_decay"),
    "hp_grad_clip": (SetHparams, "grad_clip"),
    "hp_beta1": (SetHparams, "betas"),
    "hp_beta2": (SetHparams, "betas"),
    "sched_peak": (SetSchedule, "peak_lr"),
    "sched_warmup": (SetSchedule, "warmup_steps"),
    "sched_horizon": (SetSchedule, "horizon_steps"),
    "sched_floor": (SetSchedule, "floor"),
    "sched_decay": (SetSchedule, "decay_fraction"),
    "opt_lr": (SetOptimizer, "lr"),
}
"""Each number input of the control page and the command field it fills."""


def _bounds(model: type[BaseModel], field: str) -> tuple[float | None, float | None]:
    schema = model.model_json_schema()["properties"][field]
    for option in schema.get("anyOf", [schema]):
        option = option.get("prefixItems", [option])[0]
        if option.get("type") in ("number", "integer"):
            low = option.get("minimum", option.get("exclusiveMinimum"))
            return low, option.get("maximum", option.get("exclusiveMaximum"))
    return None, None


def test_each_number_input_has_its_command_fields_bounds_default_and_help(
    trainer: ScriptedTrainer, server_url: str
) -> None:
    """Each input's range is its field's range in `protocols`, its default the field's, its help the field's text."""
    app = open_app(server_url, "views/control.py")
    for key, (model, field) in FIELDS.items():
        widget = app.number_input(key=key)
        info = model.model_fields[field]
        assert (widget.min, widget.max) == _bounds(model, field), key
        assert info.description and widget.help.startswith(info.description), key
        assert widget.value == (None if key.startswith("hp_") else info.default), key


def test_a_blank_hyperparameter_form_is_refused_with_the_models_own_words(
    trainer: ScriptedTrainer, server_url: str
) -> None:
    """Applying with every field blank shows the command model's refusal, and nothing is sent."""
    app = open_app(server_url, "views/control.py")
    [button] = [button for button in app.button if button.label == "Apply hyperparameters"]
    button.click().run()
    assert any("set_hparams must set at least one of" in str(error.value) for error in app.error)
    assert trainer.client.list_commands(trainer.run_id) == []

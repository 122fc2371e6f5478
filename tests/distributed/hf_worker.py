"""A Hugging Face `Trainer` with `SteerCallback` under torchrun, on gloo: DDP, or with `--fsdp` Accelerate's FSDP2
plugin (`fully_shard` per GPT-2 block). The callback is used unchanged.

Rank 0 hands the planned commands of tests/distributed/sharding.py to the server; every rank writes its final state,
learning rates, the commands' results and (FSDP2) its captures and gradient norms to `DIR/rank<r>.pt`.

Accelerate offers FSDP only on accelerators: on the CPU it drops the plugin and trains with DDP
(`AcceleratorState.__init__` sets `DistributedType.FSDP` only when the process group's type is one of its
`MULTI_<accelerator>` types). With `--fsdp` the worker gives the CPU group that type before the `Trainer` builds its
`Accelerator`; from there on it is Accelerate's own FSDP2 path (`fsdp2_prepare_model`) on the CPU and gloo.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelerate.state import PartialState
from accelerate.utils import DistributedType
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from protocols.client import Client
from tests.distributed.sharding import Script, start_worker
from tests.trainer.frameworks import byte_domains, tiny_gpt2
from trainer.hf import SteerCallback, unwrap_optimizer


class Follow(TrainerCallback):
    """Runs the script after the steering callback, at every boundary and before every optimizer step."""

    def __init__(self, steering: SteerCallback, script: Script) -> None:
        self.steering = steering
        self.script = script

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.script.before_optimizer_step(self.steering.steer, kwargs["model"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.script.boundary(self.steering.steer, kwargs["model"], unwrap_optimizer(kwargs["optimizer"]))


def main() -> None:
    args = start_worker("Accelerate's FSDP2 plugin")
    model = tiny_gpt2()
    # The update ratio every step: the test compares each step's with one computed from the full tensors.
    steering = SteerCallback(server=args.server, config=args.steer_config("hf"), update_every=1)
    sharding: dict[str, Any] = (
        {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}}
        if args.fsdp
        else {}
    )
    training = TrainingArguments(
        output_dir=str(args.out / "hf"), max_steps=args.max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, ddp_backend="gloo", seed=0, max_grad_norm=100.0, **sharding,
    )  # fmt: skip
    # `max_grad_norm` far above the norms: HF clips nothing, so the callback measures the norms before clipping.
    if args.fsdp:
        PartialState().distributed_type = DistributedType.MULTI_GPU
    with Client(args.server) as client:
        script = Script(client, args.rank, sharded=args.fsdp)
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=byte_domains()["prose"],
            callbacks=[steering, Follow(steering, script)],
        )
        trainer.train()
    script.save(steering.steer, model, args.out)


if __name__ == "__main__":
    main()

"""A Hugging Face `Trainer` with `SteerCallback` under torchrun (DDP on gloo): the callback used unchanged.

Rank 0 hands a learning-rate change to the server at the second step boundary; every rank writes its final
parameters, learning rate and the command's result to `DIR/rank<r>.pt`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from protocols.client import Client
from tests.distributed.worker import FAST_IO, deliver
from tests.trainer.frameworks import BLOCK, byte_domains
from trainer.hf import SteerCallback
from trainer.steer import SteerConfig


class HandOver(TrainerCallback):
    """On rank 0, submits the learning-rate change at the second boundary (applied at the third, on every rank)."""

    def __init__(self, steering: SteerCallback, client: Client, rank: int) -> None:
        self.steering = steering
        self.client = client
        self.rank = rank

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.rank == 0 and state.global_step == 2 and self.steering.steer is not None:
            deliver(self.client, self.steering.steer, {"type": "set_hparams", "lr": 5e-4})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    steering = SteerCallback(
        server=args.server, config=SteerConfig(run_name="hf-ddp", checkpoint_dir=args.out / "ck", io=FAST_IO)
    )
    training = TrainingArguments(
        output_dir=str(args.out / "hf"), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, ddp_backend="gloo", seed=0,
    )  # fmt: skip
    with Client(args.server) as client:
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=byte_domains()["prose"],
            callbacks=[steering, HandOver(steering, client, rank)],
        )
        trainer.train()
    assert steering.steer is not None
    torch.save(
        {
            "model": {key: value.clone() for key, value in model.state_dict().items()},
            "lr": [group["lr"] for group in steering.steer.live.optimizer.param_groups],
            "results": [(r.command.type, res.status, res.step) for r, res in steering.steer.results],
            "run_id": steering.steer.run_id,
        },
        args.out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()

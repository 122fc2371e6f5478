"""Fine-tune a small GPT-2 with the Hugging Face `Trainer`, steered live by runsteer through one callback.

python examples/hf_finetune.py [--server http://127.0.0.1:8765] [--steps 300]

Start the demo (`python3 dev.py demo`) first, then watch and steer this run from the dashboard like any other:
change its learning rate or data mix, pause it, roll it back. The model is built from a config and the data is
text that ships with Python, so nothing is downloaded.
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from trainer.data import arithmetic_domain, code_domain, prose_domain
from trainer.hf import SteerCallback
from trainer.mixture import DomainMixture
from trainer.steer import SteerConfig

BLOCK = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8765")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    domains = [prose_domain(200_000), code_domain(200_000), arithmetic_domain(200_000)]
    examples = {d.name: [{"input_ids": b, "labels": b} for b in d.blocks(BLOCK)] for d in domains}
    held_out = [{"input_ids": b, "labels": b} for d in domains for b in d.blocks(BLOCK, "eval")[:16]]
    mixture = DomainMixture(examples, batch_size=8, seed=0)  # the stream set_data_mix reweights
    config = GPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    with tempfile.TemporaryDirectory(prefix="runsteer-hf-") as output_dir:
        callback = SteerCallback(
            server=args.server, sampler=mixture, config=SteerConfig(run_name="hf-finetune", snapshot_every=25)
        )
        trainer = Trainer(
            model=GPT2LMHeadModel(config),
            args=TrainingArguments(
                output_dir=output_dir,
                max_steps=args.steps,
                per_device_train_batch_size=8,
                learning_rate=1e-3,
                warmup_steps=min(20, args.steps // 5),
                lr_scheduler_type="cosine",
                logging_steps=10,
                eval_strategy="steps",
                eval_steps=100,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                disable_tqdm=True,
            ),
            train_dataset=mixture,
            eval_dataset=held_out,
            callbacks=[callback],  # the one line that makes the run steerable
        )
        output = trainer.train()
    print(
        f"run {callback.steer.run_id if callback.steer else '-'}: {output.global_step} steps, "
        f"training loss {output.training_loss:.4f}"
    )


if __name__ == "__main__":
    main()

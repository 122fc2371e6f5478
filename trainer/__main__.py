"""`python -m trainer`: the built-in run, as `torchrun --nproc-per-node N -m trainer ...` starts it on each rank."""

from trainer.cli import main

raise SystemExit(main())

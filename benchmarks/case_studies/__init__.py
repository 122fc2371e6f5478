"""Case studies: the rule agent on real runs (a learning rate 10x too high, an injected fault, a data-mix change)."""

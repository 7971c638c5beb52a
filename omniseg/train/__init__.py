"""Training: the loop (:mod:`.trainer`), optimiser and schedule (:mod:`.optim`), checkpoints
(:mod:`.checkpointing`) and data-parallel plumbing (:mod:`.distributed`)."""

"""Pieces of the ``sparse_finetune`` pass: training windows, sparsity masks, the teacher, training checkpoints
and the training loop. The losses and the lr schedule are pure functions in ``compress.algos.distill``."""

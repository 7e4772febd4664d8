"""Pieces of the ``sparse_finetune`` pass: its options, training windows, sparsity masks, the teacher, training
checkpoints and the training loop. The losses and the lr schedule are pure functions in ``compress.algos.distill``.
Nothing here imports the pass module (``compress.passes.sparse_finetune``); the pass imports these."""

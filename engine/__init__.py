"""What runs a model on data: the training loop (trainer), the evaluation routine (evaluate),
test.py's run (tester), checkpoints, and the predictor for your own images.

Imports run one way: entry points -> engine -> model, util (docs/layout.md)."""

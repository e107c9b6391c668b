"""Downstream evaluation through EleutherAI lm-eval: offline tasks, the ``harness`` model, the runner."""

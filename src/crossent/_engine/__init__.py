"""Execution paths: where the logits of each row come from and how their statistics are gathered."""

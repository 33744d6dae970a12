"""Integrations with other libraries; each submodule imports its library only when it is used.

* :mod:`crossent.integrations.transformers`: train a Hugging Face transformers causal LM with any
  crossent loss, without materialising its logits (``apply(model, loss="focal")``).
"""

__all__: list[str] = []

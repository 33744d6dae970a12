"""Experiment harness behind ``crossent compare``: datasets, label corruption, models, training, metrics,
reports and plots.

Everything here is plain PyTorch plus optional packages imported where they are used (scikit-learn,
``mnist1d``, ``rdata``, matplotlib, rich/tqdm), so importing a module here never pays for them.
"""

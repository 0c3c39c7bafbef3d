"""Programs built on the library: the ``spdelta train`` job, the demo, and their data.

The library (everything else under ``spdelta`` except the command line) never imports
from here. These modules need the packages of the ``train`` extra (``transformers``,
``datasets``, ``tqdm``; ``matplotlib`` for the loss plot):

- :mod:`spdelta.recipes.job`: :func:`~spdelta.recipes.job.train_job` and its
  :class:`~spdelta.recipes.job.TrainConfig`, what ``spdelta train`` runs;
- :mod:`spdelta.recipes.demo`: ``spdelta demo``, SmolLM2 on movie reviews;
- :mod:`spdelta.recipes.data`: tables of examples, prompt layouts and batches;
- :mod:`spdelta.recipes.evaluate`: held-out loss and label accuracy;
- :mod:`spdelta.recipes.assets`: the model and data that ship in PyPI packages.

Example:
    >>> from spdelta.recipes.job import TrainConfig
    >>> TrainConfig(model="ckpt", data="rows.csv", output="task.st").method
    'speft'
"""

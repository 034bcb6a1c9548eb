"""The training recipe of the project's own models, in a room of its own: the corpora
(:mod:`~rllm.training.corpus`, :mod:`~rllm.training.pd_english`, fetched by
:mod:`~rllm.training.fetch`), the held-out sets (:mod:`~rllm.training.heldout`), the n-gram
baseline (:mod:`~rllm.training.ngram`), the seeded recipe (:mod:`~rllm.training.recipe`,
``python -m rllm.training``) and the README it writes (:mod:`~rllm.training.report`)."""

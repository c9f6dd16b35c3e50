"""The labeling web app: the human feedback of RLHF, collected the way the InstructGPT paper did.

Labelers write demonstrations, and for ranking tasks rate each of K = 2..9 outputs 1–7 with the paper's metadata
flags, then rank them (ties allowed). Each task goes to a configurable number of labelers, whose pairwise agreement
the admin page reports. ``instructgpt label export`` writes the JSONL that ``sft`` and ``rm`` read.

Modules: :mod:`.store` (SQLite), :mod:`.app` (FastAPI pages), :mod:`.rubric` (ratings, flags, validation),
:mod:`.agreement` (the math), :mod:`.formats` (import and export files), :mod:`.outputs` (model outputs),
:mod:`.security` (passwords, tokens), :mod:`.cli` (``instructgpt label``).
"""

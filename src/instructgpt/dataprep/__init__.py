"""``instructgpt data``: inspect, clean, dedup, mix and augment a data set, in any format the stages read.

Every subcommand reads a source (:mod:`instructgpt.data`'s readers, so every schema and every error of theirs), writes
a new JSONL file of the same kind of data (demonstrations stay demonstrations, rankings stay rankings) that feeds
straight into the stage that reads that kind, and writes a JSON report beside it (``OUT.report.json``). The input is
never written to.

- :mod:`~instructgpt.dataprep.rows`: reading any source as records of one kind, their texts, their output rows;
- :mod:`~instructgpt.dataprep.stats`: token lengths, percentiles, schema and duplicate counts (``inspect``);
- :mod:`~instructgpt.dataprep.cleaning`: the text rules and the row filters of ``clean``;
- :mod:`~instructgpt.dataprep.dedup`: exact and MinHash-LSH near duplicates (``datasketch``);
- :mod:`~instructgpt.dataprep.mixing`: weighted quotas across sources, with each row's provenance (``mix``);
- :mod:`~instructgpt.dataprep.augment`: prompt rewrites and noise, and best-of-n answers by a reward model
  (``augment``);
- :mod:`~instructgpt.dataprep.cli`: the command, one typed config per subcommand.
"""

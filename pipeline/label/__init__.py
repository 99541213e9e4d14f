"""The labelling service: people choose between images, the export is Pick-a-Pic v2 data.

- ``sources``: items to label from a Pick-a-Pic parquet (pairs) or a sampling folder (K images per
  prompt), and image bytes by key;
- ``storage``: the database (SQLite in WAL mode, or PostgreSQL), one row per label;
- ``people``: annotator and admin tokens (stored hashed);
- ``assignment``: who gets which item (R distinct annotators, fewest labels first, check items);
- ``audit``: agreement with the majority, Krippendorff's alpha, annotators furthest from consensus;
- ``export``: Pick-a-Pic v2 parquet for ``stages.encode`` and per-image preferences for D3PO;
- ``app``: the FastAPI app (``static/``: plain HTML and JavaScript, no build step).

``stages.label`` is its command line. Nothing else in the pipeline imports this package.
"""

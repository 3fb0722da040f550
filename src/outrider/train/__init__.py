"""The package's own training recipe for its embedded demo pair.

A small Llama *target* is pretrained on the Python standard library's source (a corpus every
machine with Python has), and a much smaller *draft* is distilled from it, so that `outrider demo`
can show speculative decoding with no download. Entry point: `outrider.train.recipe`
(`train_demo_pair`, `measure_pair_acceptance`, `main`). Nothing is imported here, so that
`python -m outrider.train.recipe` and the CLI pay for torch only when they train.
"""

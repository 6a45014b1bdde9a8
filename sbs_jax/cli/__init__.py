"""The command-line entry points: each module parses its flags and calls library code.

Library modules never import these (tests/test_layout.py checks it); `python -m sbs_jax.train`
and the other documented commands forward here, as do the `sbs-*` console scripts.
"""

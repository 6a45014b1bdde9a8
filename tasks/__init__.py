"""SeqIO Tasks and Mixtures for sbs-jax (registered on import; no files, gin or network touched)."""

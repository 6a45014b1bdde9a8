"""The data layer: record schema, teacher-completion parsing, released-data readers, the built-in
synthetic dataset, the build/stats jobs and the paired input pipeline."""

"""What every job needs around the model: process start-up across hosts (distributed), TF
loaded quietly with its GPUs hidden (tf_setup), the C allocator (malloc), gin flags (gin_utils)
and time-stamped console lines (console)."""

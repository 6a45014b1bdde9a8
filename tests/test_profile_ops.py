"""benchmarks/profile_ops.py: per-op times of greedy decoding, labelled from the optimised HLO."""

import json
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "profile_ops.py"


def test_decode_profile_labels_the_loop_body_and_drops_control_flow():
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device; the script adds its dump flag
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--what", "decode", "--config", "t5_1_1_tiny",
         "--batch", "2", "--input_len", "8", "--decode_len", "3", "--top", "200"],
        capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    result = json.loads(out[out.index("{"):])
    assert result["what"] == "decode" and result["total_ms"] > 0
    ops = {(row["pass"], row["op"]) for row in result["top_ops"]}
    # The LM head runs once per generated token inside the while loop; the encoder outside it.
    assert any(where == "loop body" and "logits" in op and op.endswith("dot_general")
               for where, op in ops)
    assert any(where == "other" and op.startswith("encode/encoder/") for where, op in ops)
    # A while thunk's time contains its body's: counting it too would double the loop.
    assert not any(op.startswith(("while", "conditional")) for _, op in ops)
    assert abs(sum(result["by_pass_ms"].values()) - result["total_ms"]) < 1e-6 * result["total_ms"]

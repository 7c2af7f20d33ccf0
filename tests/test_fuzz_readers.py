"""The checkpoint readers (import_saev, load_sae, backbones.load) on thousands of broken files:
truncations, bit flips and overwritten bytes, weighted to the headers. Each broken file loads or
raises the reader's one error type naming the file, and memory stays bounded."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_broken_files_give_one_error_type_naming_the_file_in_bounded_memory(tmp_path):
    out = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_readers.py"), str(out), "3000"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    for name, counts in report["results"].items():
        assert counts["refused"] > 100, (name, counts)  # it really tried
    growth_mib = (report["peak_kib_after"] - report["peak_kib_before"]) / 1024
    assert growth_mib < 256, f"peak memory grew by {growth_mib:.0f} MiB while fuzzing"

"""Every reader saejax has, on broken copies of valid files made by hypothesis
(tests/fuzz_readers.py): saev checkpoints of every era, SAELens directories, the portable SAE,
activation shards, normalization.npz, orbax checkpoints, metrics.jsonl and HF backbone
directories. Each case ends in the reader's one documented error naming the file, or in a
result that is not silently different; in bounded time and memory."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = 100  # per file (a fifth for backbone and orbax files); `python tests/fuzz_readers.py OUT N` for more


def test_broken_files_give_one_error_type_naming_the_file_in_bounded_memory(tmp_path):
    out = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_readers.py"), str(out), str(CASES)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert {name.split()[0] for name in results} == {"import_saev", "import_saelens", "load_sae", "shards",
                                                     "normalization.npz", "orbax", "metrics.jsonl", "backbones.load"}
    assert sum(name.startswith("import_saev") for name in results) == 6  # 0.1.0 and five schemas
    for name, counts in results.items():
        want = CASES // 5 if name.startswith(("backbones", "orbax")) else CASES
        assert counts["cases"] == want and counts["loaded"] + counts["refused"] == want, (name, counts)
        if not name.startswith(("orbax", "metrics")):  # those two read what they can instead of refusing
            assert counts["refused"] > want // 2, (name, counts)  # it really broke them
    total = sum(c["cases"] for c in results.values())
    growth_mib = (report["peak_kib_after"] - report["peak_kib_before"]) / 1024
    print(f"{total} fuzz cases over {len(results)} files; peak memory grew by {growth_mib:.0f} MiB")
    assert growth_mib < 256, f"peak memory grew by {growth_mib:.0f} MiB while fuzzing"

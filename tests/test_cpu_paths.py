"""The same CPU run on another x86 machine: ATen and MKL pick their kernels by instruction set, so a run's last bits
depend on the CPU unless their code paths are pinned (`run_dir.CPU_PINS`, set by `stem-nb reproduce`). Here one
machine plays two: its own AVX-512 paths, and a machine limited to AVX2 (`ATEN_CPU_CAPABILITY=avx2`,
`MKL_ENABLE_INSTRUCTIONS=AVX2`). Each run is `stem-nb train` of the debug config, 4 steps, and its weights' digest."""
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import hashlib, json, subprocess, sys
from pathlib import Path

import pytest, torch

from stem_nb.run_dir import CPU_PINS

ROOT = Path(__file__).resolve().parents[1]
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ISA_VARS = (*CPU_PINS, "MKL_ENABLE_INSTRUCTIONS")


def train(tmp_path, name: str, env: dict) -> tuple[str, dict]:
    "(digest of the final weights, the run's machine.json entry) of a 4-step debug run under `env`."
    base = {k: v for k, v in os.environ.items() if k not in ISA_VARS}
    dump = tmp_path / name
    r = subprocess.run([sys.executable, "-m", "stem_nb.train", str(ROOT / "experiments/configs/debug.yaml"), f"dump_dir={dump}",
                        "steps=4", "val_batches=0", "checkpoint.every=4", "distributed.stem_parallel_size=1"],
                       capture_output=True, text=True, timeout=600, env={**base, "OMP_NUM_THREADS": "2", **env}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    code = ("import hashlib, sys; from stem_nb.restore import load_model; h = hashlib.sha256()\n"
            "for k, v in sorted(load_model(sys.argv[1]).state_dict().items()): h.update(k.encode()); h.update(v.numpy().tobytes())\n"
            "print(h.hexdigest())")
    d = subprocess.run([sys.executable, "-c", code, str(dump)], capture_output=True, text=True, timeout=300)
    assert d.returncode == 0, d.stderr[-2000:]
    (entry,) = json.loads((dump / "machine.json").read_text())
    return d.stdout.strip().splitlines()[-1], entry


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs an AVX-512 CPU to play both machines")
def test_pinned_runs_match_across_instruction_sets_and_unpinned_do_not(tmp_path):
    native, m0 = train(tmp_path, "native", {})
    avx2, m1 = train(tmp_path, "avx2_machine", AVX2_MACHINE)
    pinned, m2 = train(tmp_path, "native_pinned", CPU_PINS)
    pinned_avx2, m3 = train(tmp_path, "avx2_machine_pinned", {**AVX2_MACHINE, **CPU_PINS})
    assert native != avx2                                     # unpinned: the instruction set shows in the weights
    assert pinned == pinned_avx2                              # pinned: bitwise the same on both
    assert (m0["aten_cpu_capability"], m1["aten_cpu_capability"]) == ("AVX512", "AVX2")
    assert m2["ATEN_CPU_CAPABILITY"] == "avx2" and m2["MKL_CBWR"] == "AVX2" and m0["MKL_CBWR"] is None
    assert m0["cpu_model"] and m0["cpu_model"] == m2["cpu_model"] and m0["threads"] == 2

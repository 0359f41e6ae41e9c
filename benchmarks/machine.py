"""What CPU a benchmark ran on: VMs of the same "kind" differ between sessions (the 2-core
AMD EPYC VMs here have been seen both without AVX-512 and as family 25 / model 17 = Zen 4
with AVX-512), so every speed record names it."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_info() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cpu_family": None, "cpu_model": None,
            "vector_isa": None, "nproc": os.cpu_count()}
    seen = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key in seen:  # the first processor's lines only
                continue
            seen.add(key)
            if key == "model name":
                info["cpu"] = val
            elif key == "cpu family":
                info["cpu_family"] = int(val)
            elif key == "model":
                info["cpu_model"] = int(val)
            elif key == "flags":
                flags = set(val.split())
                info["vector_isa"] = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
                break
    except OSError:
        pass
    return info


def cpu_label() -> str:
    i = cpu_info()
    return (f"{i['cpu']} (family {i['cpu_family']} model {i['cpu_model']}, {i['vector_isa']}, "
            f"{i['nproc']} cores)")


if __name__ == "__main__":
    print(cpu_label())

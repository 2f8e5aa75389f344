"""Where the packed forward spends GPU time: a torch.profiler kernel table for one workload.

    python bench/profile_forward.py --workload uniform_32x448 [--compile] [--rows 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="uniform_32x448")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    patch, workloads = bench.load_workloads()
    device = torch.device("cuda")
    packed, _ = bench.build_models(bench.VARIANTS["large"], "auto", torch.bfloat16, device, with_source=False)
    forward = packed.compile_fused() if args.compile else packed
    grids = bench.patch_grid(workloads[args.workload], patch)
    pack = bench.make_pack(workloads[args.workload], 3, patch, torch.bfloat16, device)
    grid_thw = torch.tensor(grids)
    with torch.inference_mode():
        for _ in range(3):
            forward(pack, grid_thw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                forward(pack, grid_thw)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()

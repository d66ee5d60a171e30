"""Training-step speed, memory and efficiency: unet3d vs pytorch-3dunet and MONAI; CPU options; ONNX.

Usage:
    .venv/bin/python -m benchmarks.bench_train_step [--quick] [--peer-python .venv-bench/bin/python]

One training step = forward, cross-entropy, backward and an SGD step (momentum 0.99, as in the
paper), batch 1, float32, 1 input channel, 3 classes, 4 levels. Every configuration runs in a
fresh process, so its peak resident memory (ru_maxrss) is its own; the time is the median of
the repeats after one warm-up step. FLOPs per step come from torch's FlopCounterMode and are
divided by the median time, then compared with the machine's peak measured in the same run
(a large float32 matmul and a large 3D convolution).

Widths are matched to unet3d's (first convolution w, then 2w before pooling; levels
w/2w, 2w/4w, 4w/8w, 8w/16w) as closely as each peer's API allows:
  pytorch-3dunet UNet3D   f_maps = (2w, 4w, 8w, 16w), layer_order 'cbr': its encoder halves the
                          first convolution, so the widths are exactly unet3d's; nearest-neighbour
                          upsampling instead of up-convolutions, no conv bias.
  MONAI BasicUNet         features = (2w, 4w, 8w, 16w, 16w, 2w), batch norm, ReLU: its depth is
                          fixed at five levels, the extra one is kept at 16w.
  MONAI UNet              channels = (2w, 4w, 8w, 16w), strides 2, two residual units, batch norm,
                          ReLU: strided convolutions instead of pooling.
The peers run from a separate environment (benchmarks/peers.sh creates .venv-bench); without it
their rows are skipped with a note. The ONNX rows need onnxruntime in the running environment.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import median_time

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER_PYTHON = REPO / ".venv-bench" / "bin" / "python"
CLASSES = 3


# ----------------------------------------------------------------------------- models


def unet3d_model(width: int, padding: str, levels: int = 4) -> torch.nn.Module:
    from unet3d.model import UNet, UNetConfig

    return UNet(UNetConfig(in_channels=1, num_classes=CLASSES, width=width, levels=levels, padding=padding))


def pytorch3dunet_model(width: int, levels: int = 4) -> torch.nn.Module:
    from pytorch3dunet.unet3d.model import UNet3D

    f_maps = [2 * width * 2**level for level in range(levels)]
    return UNet3D(in_channels=1, out_channels=CLASSES, f_maps=f_maps, layer_order="cbr", num_levels=levels,
                  is_segmentation=False)


def monai_basicunet_model(width: int) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    features = (2 * width, 4 * width, 8 * width, 16 * width, 16 * width, 2 * width)
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=CLASSES, features=features, norm="batch", act="relu")


def monai_unet_model(width: int, levels: int = 4) -> torch.nn.Module:
    from monai.networks.nets import UNet

    channels = [2 * width * 2**level for level in range(levels)]
    return UNet(spatial_dims=3, in_channels=1, out_channels=CLASSES, channels=channels, strides=[2] * (levels - 1),
                num_res_units=2, norm="batch", act="relu")


def build(case: dict) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The case's network and its input size (enlarged for valid padding so the output is `patch`)."""
    patch, width, levels = case["patch"], case["width"], case["levels"]
    name = case["model"]
    if name.startswith("unet3d"):
        model = unet3d_model(width, case["padding"], levels)
        return model, model.geometry.input_shape_for_output((patch,) * 3)
    if name == "pytorch-3dunet":
        return pytorch3dunet_model(width, levels), (patch,) * 3
    if name == "monai-basicunet":
        return monai_basicunet_model(width), (patch,) * 3
    if name == "monai-unet":
        return monai_unet_model(width, levels), (patch,) * 3
    raise ValueError(f"unknown model {name!r}")


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- one case per process


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_step(model, x, target, optimizer, case: dict):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.get("bf16", False))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), target).backward()
        optimizer.step()

    return step


def count_flops(function) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


def run_train_case(case: dict) -> dict:
    torch.manual_seed(0)
    idle = rss_mib()
    model, input_shape = build(case)
    model.train()
    x = torch.randn(1, 1, *input_shape)
    if case.get("channels_last"):
        model, x = model.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        output_shape = tuple(model(x).shape[2:])
    target = torch.randint(0, CLASSES, (1, *output_shape))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.99)
    flops = count_flops(training_step(model, x, target, optimizer, case))
    runner = torch.compile(model) if case.get("compile") else model
    seconds = median_time(training_step(runner, x, target, optimizer, case), case["repeats"])
    return {"params": parameter_count(model), "input": input_shape, "output": output_shape, "seconds": seconds,
            "flops": flops, "peak_mib": rss_mib(), "idle_mib": idle}


def run_peak_case(case: dict) -> dict:
    """Achievable float32 throughput: a square matmul and a 3×3×3 convolution of U-Net size."""
    n = case["matmul"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = median_time(lambda: a @ b, case["repeats"])
    c, s = case["conv_channels"], case["conv_size"]
    x, w = torch.randn(1, c, s, s, s), torch.randn(c, c, 3, 3, 3)
    conv = median_time(lambda: torch.nn.functional.conv3d(x, w, padding=1), case["repeats"])
    conv_flops = 2 * c * c * 27 * s**3
    return {"matmul_gflops": 2 * n**3 / matmul / 1e9, "conv3d_gflops": conv_flops / conv / 1e9}


def run_onnx_case(case: dict) -> dict:
    """Inference on one tile: PyTorch as `unet3d predict` runs it vs ONNX Runtime on the export."""
    import numpy as np
    import onnxruntime

    from unet3d.export import export_onnx
    from unet3d.inference.predictor import prepare_network

    torch.manual_seed(0)
    model = unet3d_model(case["width"], case["padding"], case["levels"]).eval()
    shape = model.geometry.input_shape_for_output((case["patch"],) * 3)
    tile = np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32)
    net = prepare_network(model, torch.device("cpu"))
    x = torch.from_numpy(tile).contiguous(memory_format=torch.channels_last_3d)

    def torch_forward():
        with torch.inference_mode():
            return net(x)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = case["threads"]
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ort_forward = lambda: session.run(None, {"image": tile})[0]  # noqa: E731
        difference = float(np.abs(ort_forward() - torch_forward().numpy()).max())
        return {"input": shape, "output": tuple(torch_forward().shape[2:]), "difference": difference,
                "torch_seconds": median_time(torch_forward, case["repeats"]),
                "ort_seconds": median_time(ort_forward, case["repeats"])}


CASE_RUNNERS = {"train": run_train_case, "peak": run_peak_case, "onnx": run_onnx_case}


def child_main(cases: list[dict]) -> None:
    for case in cases:
        torch.set_num_threads(case["threads"])
        try:
            result = CASE_RUNNERS[case["kind"]](case)
        except Exception as exc:  # reported as a row of the table, not a crash of the whole run
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
        print("RESULT " + json.dumps(result), flush=True)


def run_cases(cases: list[dict], python: str, timeout: float) -> list[dict]:
    """Results of `cases`, run one after another in one fresh process."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    command = [python, "-m", "benchmarks.bench_train_step", "--case", json.dumps(cases)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout * len(cases), env=env,
                              cwd=REPO)
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        stdout, stderr = exc.stdout or "", f"over the {timeout:.0f} s limit per configuration"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    results = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    reason = (stderr.strip().splitlines() or ["no output"])[-1][:160]
    return results + [{"error": reason}] * (len(cases) - len(results))


def run_in_fresh_process(case: dict, python: str, timeout: float) -> dict:
    return run_cases([case], python, timeout)[0]


# ----------------------------------------------------------------------------- plans and tables


def train_cases(quick: bool, repeats: int, threads: int) -> list[tuple[str, list[dict]]]:
    """(table title, cases): peers at the same widths, then the CPU options on unet3d."""
    sizes = [(2, 32, 3)] if quick else [(16, 64, 4), (32, 48, 4)]
    tables = []
    for width, patch, levels in sizes:
        base = {"kind": "train", "width": width, "patch": patch, "levels": levels, "repeats": repeats,
                "threads": threads, "channels_last": False}
        cases = [
            dict(base, model="unet3d", padding="same", label="unet3d same"),
            dict(base, model="unet3d", padding="same", channels_last=True, label="unet3d same, channels_last"),
            dict(base, model="unet3d", padding="valid", label="unet3d valid (input enlarged)"),
            dict(base, model="pytorch-3dunet", label="pytorch-3dunet UNet3D", peer=True),
            dict(base, model="monai-basicunet", label="MONAI BasicUNet (5 levels)", peer=True),
            dict(base, model="monai-unet", label="MONAI UNet", peer=True),
        ]
        tables.append((f"Training step, first width {width}, {patch}^3 output, {levels} levels", cases))
    width, patch, levels = sizes[0]
    base = {"kind": "train", "model": "unet3d", "padding": "same", "width": width, "patch": patch,
            "levels": levels, "repeats": repeats, "threads": threads, "channels_last": True}
    options = [dict(base, channels_last=False, label="channels_last off"), dict(base, label="channels_last on"),
               dict(base, threads=1, label="channels_last on, 1 thread")]
    if quick:
        options.append(dict(base, bf16=True, label="channels_last on, bf16 autocast"))
    else:
        tiny = dict(base, width=4, patch=16, levels=3, repeats=1)
        options += [dict(base, compile=True, repeats=max(1, repeats // 2), label="channels_last on, torch.compile"),
                    dict(tiny, label="tiny (w 4, 16^3, 3 levels), float32"),
                    dict(tiny, bf16=True, label="tiny (w 4, 16^3, 3 levels), bf16 autocast")]
    tables.append((f"CPU options, unet3d same padding, first width {width}, {patch}^3", options))
    return tables


def format_train_row(case: dict, result: dict, peak_gflops: float | None, reference: dict | None) -> str:
    if "error" in result:
        return f"| {case['label']} | – | – | – | – | – | – | – | {result['error']} |"
    out_voxels = 1
    for n in result["output"]:
        out_voxels *= n
    gflops = result["flops"] / result["seconds"] / 1e9
    share = f"{100 * gflops / peak_gflops:.0f}%" if peak_gflops else "–"
    ratio = f"{result['seconds'] / reference['seconds']:.2f}" if reference and "seconds" in reference else "–"
    shape = "×".join(map(str, result["input"])) + " → " + "×".join(map(str, result["output"]))
    return (f"| {case['label']} | {result['params']:,} | {shape} | {result['seconds']:.3f} | "
            f"{out_voxels / result['seconds'] / 1e3:.1f} | {result['peak_mib']:.0f} ({result['peak_mib'] - result['idle_mib']:+.0f}) | "
            f"{result['flops'] / 1e9:.1f} | {gflops:.1f} ({share}) | {ratio} |")


TRAIN_HEADER = ("| configuration | parameters | input → output | s/step | output kvoxel/s | peak RSS MiB (above idle) "
                "| GFLOP/step | GFLOP/s (of conv peak) | time ÷ unet3d same |\n|---|---:|---|---:|---:|---:|---:|---:|---:|")


def run_all(cases: list[dict], peer_python: str | None, timeout: float, shared: bool):
    """Results in the order of `cases`, yielded as they come: one fresh process per case, or with
    `shared` one process per environment (quick mode: far fewer interpreter starts, but the peak
    memory is cumulative)."""
    skipped = {"error": "skipped: no peer environment (bash benchmarks/peers.sh)"}
    python_of = [peer_python if case.get("peer") else sys.executable for case in cases]
    if not shared:
        for case, python in zip(cases, python_of):
            yield run_in_fresh_process(case, python, timeout) if python else skipped
        return
    results = [skipped] * len(cases)
    for python in {p for p in python_of if p}:
        group = [i for i, p in enumerate(python_of) if p == python]
        for i, result in zip(group, run_cases([cases[i] for i in group], python, timeout)):
            results[i] = result
    yield from results


def print_train_tables(tables, peer_python: str | None, timeout: float, peak_gflops: float | None, shared: bool) -> None:
    cases = [case for _, table in tables for case in table]
    results = iter(run_all(cases, peer_python, timeout, shared))
    for title, table in tables:
        print(f"\n### {title}\n\n{TRAIN_HEADER}")
        reference = None
        for case in table:
            result = next(results)
            reference = reference or result
            print(format_train_row(case, result, peak_gflops, reference), flush=True)


def print_peak(case: dict, timeout: float) -> float | None:
    result = run_in_fresh_process(case, sys.executable, timeout)
    print("\n### Machine peak (float32, same threads)\n")
    if "error" in result:
        print(f"peak measurement failed: {result['error']}")
        return None
    print(f"- matmul {case['matmul']}²: {result['matmul_gflops']:.1f} GFLOP/s\n"
          f"- conv3d {case['conv_channels']}→{case['conv_channels']} channels, 3³ kernel, {case['conv_size']}³: "
          f"{result['conv3d_gflops']:.1f} GFLOP/s")
    return result["conv3d_gflops"]


def print_onnx(case: dict, timeout: float) -> None:
    print(f"\n### Inference on one tile: PyTorch (folded, channels_last) vs ONNX Runtime, first width {case['width']}, "
          f"{case['padding']} padding\n")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("skipped: onnxruntime is not installed in this environment (pip install 'unet3d[onnx]')")
        return
    result = run_in_fresh_process(case, sys.executable, timeout)
    if "error" in result:
        print(f"failed: {result['error']}")
        return
    shape = "×".join(map(str, result["input"])) + " → " + "×".join(map(str, result["output"]))
    print(f"| tile | PyTorch s | ONNX Runtime s | PyTorch ÷ ORT | max abs difference |\n|---|---:|---:|---:|---:|\n"
          f"| {shape} | {result['torch_seconds']:.3f} | {result['ort_seconds']:.3f} | "
          f"{result['torch_seconds'] / result['ort_seconds']:.2f} | {result['difference']:.1e} |")


def peer_environment(path: str) -> str | None:
    return path if Path(path).is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test for CI (< 60 s)")
    parser.add_argument("--repeats", type=int, help="timed steps per configuration (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument("--peer-python", default=str(DEFAULT_PEER_PYTHON), help="python of the peer environment")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per configuration")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child_main(json.loads(args.case))
        return
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, even in a file
    repeats = args.repeats or (1 if args.quick else 3)
    peer_python = peer_environment(args.peer_python)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU(s); median of {repeats} "
          f"after one warm-up; peers: {peer_python or 'skipped (no ' + args.peer_python + ')'}")
    peak_case = {"kind": "peak", "threads": args.threads, "repeats": repeats,
                 "matmul": 512 if args.quick else 2048, "conv_channels": 32 if args.quick else 64,
                 "conv_size": 16 if args.quick else 32}
    peak = print_peak(peak_case, args.timeout)
    print_train_tables(train_cases(args.quick, repeats, args.threads), peer_python, args.timeout, peak, args.quick)
    onnx_case = {"kind": "onnx", "threads": args.threads, "repeats": repeats, "padding": "valid",
                 "width": 2 if args.quick else 16, "levels": 3 if args.quick else 4, "patch": 16 if args.quick else 64}
    print_onnx(onnx_case, args.timeout)


if __name__ == "__main__":
    main()

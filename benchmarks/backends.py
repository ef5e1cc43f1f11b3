"""Optional inference backends for the classification CNN, measured side by side.

For each backend (PyTorch eager with BatchNorm folded, ``torch.compile`` per stage and head,
ONNX Runtime per stage and head), the exit outputs are first checked against eager PyTorch
(to 1e-5) and then the full model and one policy are timed at batch 1 and 256 (interleaved,
``exitguard.nn.measure_speedup``). A backend is worth adopting only if it wins here.

    pip install onnxruntime onnx     # optional: the ONNX Runtime row is skipped without them
    python benchmarks/backends.py --dataset digits --threshold 0.58

Measured on an idle 2-core machine (digits, threshold 0.58): neither backend beats eager
PyTorch with BatchNorm folded (torch.compile equal within noise, ONNX Runtime slower at every
batch size), so exitguard keeps eager execution.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from exitguard.nn import measure_speedup, optimize_for_inference
from exitguard.tasks.classification import DemoConfig, prepare
from exitguard.tasks.common import machine_info


class OrtModule(nn.Module):
    """One exported stage or head run by ONNX Runtime (float32 in, float32 out)."""

    def __init__(self, module: nn.Module, example: torch.Tensor, folder: Path, name: str):
        super().__init__()
        import onnxruntime as ort

        path = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                dynamo=False,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (y,) = self.session.run(None, {"x": x.contiguous().numpy()})
        return torch.from_numpy(y)


def compiled(network):
    # The heads share one forward: each head's shapes are one more compiled variant.
    torch._dynamo.config.recompile_limit = 64
    copied = copy.deepcopy(network)
    copied.stages = nn.ModuleList([torch.compile(s, dynamic=True) for s in copied.stages])
    copied.heads = nn.ModuleList([torch.compile(h, dynamic=True) for h in copied.heads])
    return copied


def onnx_runtime(network, example, folder):
    copied = copy.deepcopy(network)
    stages, heads, h = [], [], example
    for index, (stage, head) in enumerate(zip(network.stages, network.heads, strict=True)):
        stages.append(OrtModule(stage, h, folder, f"stage{index}"))
        h = stage(h)
        heads.append(OrtModule(head, h, folder, f"head{index}"))
    copied.stages, copied.heads = nn.ModuleList(stages), nn.ModuleList(heads)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--threshold", type=float, default=0.58)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    prepared = prepare(DemoConfig(dataset=args.dataset, progress=False), log=lambda _: None)
    images = torch.from_numpy(prepared.heldout.images)
    reference, _ = optimize_for_inference(prepared.network)
    with torch.inference_mode():
        expected = reference(images[:64])
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        backends = {"eager (folded)": reference}
        backends["torch.compile"] = compiled(reference)
        try:
            backends["onnxruntime"] = onnx_runtime(reference, images[:2], Path(folder))
        except ImportError as error:
            print(f"onnxruntime row skipped: {error}")
        print(
            f"{'backend':<16}{'max |diff|':>11}{'batch':>6}{'full ms/sample':>16}"
            f"{'policy ms/sample':>18}{'speed-up':>10}"
        )
        for name, network in backends.items():
            begin = time.perf_counter()
            diff = float((network(images[:64]) - expected).abs().max())
            setup = time.perf_counter() - begin
            for batch in (1, 256):
                x = images if batch > 1 else images[:200]
                m = measure_speedup(
                    network, x, args.threshold, batch_size=batch, repeats=args.repeats
                )
                rows.append(
                    {"backend": name, "max_abs_diff": diff, "first_call_s": setup, **m.to_dict()}
                )
                print(
                    f"{name:<16}{diff:>11.1e}{batch:>6}{m.full_ms:>16.4f}{m.early_ms:>18.4f}"
                    f"{m.measured_speedup:>9.2f}x"
                )
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "backends.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "dataset": args.dataset,
                "threshold": args.threshold,
                "machine": machine_info(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()

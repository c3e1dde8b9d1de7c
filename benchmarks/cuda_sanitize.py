"""Every CUDA kernel of the cuda backend once, on small odd shapes that reach each configuration
(LayerNorm rows of 1..512 threads with 1/2/4 column groups and the long-row kernels, forward and
backward, with and without residual / weight / bias; bias + Leaky ReLU per column and per row, with
the sign mask; the multi-tensor norm and scale with the small and the large parameter struct;
GroupNorm and BatchNorm NCHW and channels-last, vector and element-wise paths, several splits, with
and without weight / bias, fp32 parameters of bf16 input), for
compute-sanitizer (benchmarks/gpu_cuda_stage.sh runs it under memcheck and racecheck; set
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that an out-of-bounds access leaves its allocation). Exits 0 when
every call returned; the sanitizer's exit code tells the rest."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fusedstab  # noqa: E402
from fusedstab import functional as FF  # noqa: E402

OPS = torch.ops.fusedstab


def main() -> int:
    dev = "cuda"
    with fusedstab.use_backend("cuda"):
        for N in (1, 7, 64, 1000, 4100, 9000, 17000):
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(5, N, device=dev, dtype=dtype, requires_grad=True)
                r = torch.randn(5, N, device=dev, dtype=dtype, requires_grad=True)
                w = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
                b = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
                y = FF.layer_norm(x, (N,), w, b)
                y.backward(torch.randn_like(y))
                y = FF.rms_norm(x[:, : N - 1] if N > 1 else x, (max(N - 1, 1),), None)  # strided, unaligned
                y.backward(torch.randn_like(y))
                y, h = FF.add_layer_norm(x, r, (N,), w, None, 1e-5, True)
                (y.float().sum() + h.float().sum()).backward()
        x = torch.randn(3, 9, 7, 5, device=dev, dtype=torch.float16, requires_grad=True)
        bias = torch.randn(9, device=dev, dtype=torch.float32, requires_grad=True)
        for slope in (0.01, -0.3):
            FF.bias_leaky_relu(x, bias, slope, 1).sum().backward()
            FF.bias_leaky_relu(x.permute(0, 2, 3, 1), bias, slope, -1).sum().backward()
        for n in (3, 70):
            ts = [torch.randn(s, device=dev) for s in ([1, 0, 40000, 33][i % 4] for i in range(n))]
            ts.append(torch.randn(1001, device=dev)[1:])
            for p in (2.0, float("inf"), 0.0, 1.5):
                OPS.multi_tensor_norm(ts, p)
            OPS.multi_tensor_scale_(ts, torch.tensor(0.5, device=dev), True)
        for shape in ((2, 12, 9, 7), (1, 64, 32, 32), (3, 40, 1, 1)):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(shape, device=dev, dtype=torch.bfloat16).contiguous(memory_format=fmt)
                x.requires_grad_()
                w = torch.randn(shape[1], device=dev, requires_grad=True)
                b = torch.randn(shape[1], device=dev, requires_grad=True)
                FF.group_norm(x, 4, w, b, 1e-5, "silu").sum().backward()
                FF.group_norm(x, 2, None, None, 1e-5, "leaky_relu", 0.1).sum().backward()
                FF.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, "relu").sum().backward()
                FF.batch_norm(x, torch.zeros(shape[1], device=dev), torch.ones(shape[1], device=dev), w, None,
                              False).sum().backward()
    torch.cuda.synchronize()
    print("cuda_sanitize: every kernel ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())

// The schemas of every C++ op, in fusedstab's private namespace ``fusedstab_C`` (never ``fusedstab``:
// the Python custom ops own the public names and choose a backend per call; a C++ kernel registered
// there would take calls away from that choice). Each csrc/cpu/<op>.cpp (and later csrc/cuda/<op>.cpp)
// registers its kernels with TORCH_LIBRARY_IMPL(fusedstab_C, CPU / CUDA, m).
//
// Every op is an out-variant: the public op (fusedstab/ops/<op>.py) allocates the outputs with the
// function its fake uses, handles empty input and canonical layouts, then the kernel writes into the
// outputs it is given and returns nothing. The layouts each op may assume are in fusedstab/ops/<op>.py;
// each kernel still checks them (TORCH_CHECK), so a direct torch.ops.fusedstab_C call with bad
// arguments raises instead of reading out of bounds.
#include <torch/library.h>

TORCH_LIBRARY(fusedstab_C, m) {
  // LayerNorm / RMSNorm (+ fused residual add)
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool rms, "
        "Tensor(a!) y, Tensor(b!) h, Tensor(c!) mean, Tensor(d!) rstd) -> ()");
  m.def("layer_norm_bwd(Tensor dy, Tensor h, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "Tensor? dh, bool rms, Tensor(a!) dx, Tensor(b!) dweight, Tensor(c!) dbias) -> ()");
  // GroupNorm (+ activation)
  m.def("group_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, str activation, "
        "float slope, Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd) -> ()");
  m.def("group_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "int num_groups, str activation, float slope, Tensor(a!) dx, Tensor(b!) dweight, Tensor(c!) dbias) -> ()");
  // BatchNorm (+ activation), in the four steps SyncBatchNorm reduces between
  m.def("batch_norm_stats(Tensor x, Tensor(a!) stats) -> ()");
  m.def("batch_norm_elemt(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, str activation, "
        "float slope, Tensor(a!) y) -> ()");
  m.def("batch_norm_bwd_reduce(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "str activation, float slope, Tensor(a!) sums) -> ()");
  m.def("batch_norm_bwd_elemt(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "Tensor? coef, str activation, float slope, Tensor(a!) dx) -> ()");
  // bias + Leaky ReLU, Linear + bias + Leaky ReLU
  m.def("bias_leaky_relu_fwd(Tensor x, Tensor? bias, float slope, bool per_row, Tensor(a!) y, Tensor(b!) mask) -> ()");
  m.def("bias_leaky_relu_bwd(Tensor dy, Tensor saved, float slope, bool per_row, int C, Tensor(a!) dx, "
        "Tensor(b!) dbias) -> ()");
  m.def("linear_leaky_relu_fwd(Tensor x, Tensor weight, Tensor? bias, float slope, Tensor(a!) y, "
        "Tensor(b!) mask) -> ()");
  // scaled dot-product attention
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale, float dropout_p, "
        "int seed, int offset, Tensor(a!) o, Tensor(b!) lse) -> ()");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? mask, bool causal, "
        "float scale, float dropout_p, int seed, int offset, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, "
        "Tensor(d!) dmask) -> ()");
  // multi-tensor norm and scale (global-norm gradient clipping)
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type, Tensor(a!) out) -> ()");
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor coef, bool zero_nonfinite) -> ()");
  // gradient statistics and the finishing program of an adaptive clipping step (csrc/cpu/grad_stats.cpp)
  m.def("grad_stats(Tensor[] tensors, Tensor(a!) out) -> ()");
  m.def("grad_clip_finish(Tensor stats, Tensor(a!) state, Tensor? max_norm, float max_norm_value, str clip_mode, "
        "int warmup, float z_thresh, float alpha, float eps, float q, bool skip_nonfinite, float skip_above, "
        "Tensor(b!) ring_tensors, Tensor(c!) ring_scalars, Tensor(d!) total, Tensor(e!) coef, Tensor(f!) found_inf, "
        "Tensor(g!) threshold) -> ()");
}

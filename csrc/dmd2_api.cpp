// The one binding file of the dmd2 extension: input checks, layout handling and torch.library registration.
//
// Ops (namespace dmd2; fake/meta kernels and autograd are registered from Python in dmd2/kernels/cuda.py):
//   dm_grad_ext(x, real_x0, fake_x0, eps)        -> g               DMD2 Sec. 3 / DMD Eq. 7 gradient
//   dm_loss_ext(x, real_x0, fake_x0, eps)        -> (loss, g)       loss = 0.5 * mean(g^2), d loss / dx = g / numel
//   noise_add_ext(x0, alpha, sigma, seed, offset) -> x_t            x_t = alpha_b * x0 + sigma_b * philox_normal
//
// Every check runs before any kernel and raises ValueError (TORCH_CHECK_VALUE) naming what was expected.
// Only metadata is read: no host synchronisation.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "dmd2_kernels.h"

namespace dmd2 {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    s += std::to_string(t.size(d));
    if (d + 1 < t.dim() || t.dim() == 1) s += ",";
    if (d + 1 < t.dim()) s += " ";
  }
  return s + ")";
}

// True when the elements of every sample t[b] are contiguous (row-major) in memory; the batch stride is free.
bool samples_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) == 1) continue;
    if (t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// Inputs whose samples are strided inside (e.g. channels-last, transposed) are copied once into row-major order;
// batch-strided inputs (slices along B, expanded batch) are read in place.
at::Tensor with_contiguous_samples(const at::Tensor& t) {
  return samples_contiguous(t) ? t : t.contiguous();
}

void check_device(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), op, ": expected ", name,
                    " on a CPU or CUDA device, got ", t.device());
#ifndef DMD2_WITH_CUDA
  TORCH_CHECK(!t.device().is_cuda(), op, ": ", name, " is a CUDA tensor but this build of the dmd2 extension has no "
              "CUDA kernels (it was built without a CUDA toolkit; see dmd2.kernels.cuda)");
#endif
}

// The acceptance rules every backend shares (dmd2/kernels/contracts.py): a non-empty (B, ...) tensor, B >= 1,
// of dtype float32 / bfloat16 / float16.
void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.numel() > 0, op, ": expected ", name,
                    " to be a non-empty (B, ...) tensor with B >= 1, got shape ", shape_str(t));
  TORCH_CHECK_VALUE(is_supported_dtype(t.scalar_type()), op, ": expected ", name,
                    " of dtype float32, bfloat16 or float16, got ", t.scalar_type());
  check_device(t, op, name);
}

// x, real_x0, fake_x0: same shape (batch size first), dtype and device.
void check_dm_inputs(const at::Tensor& x, const at::Tensor& real_x0, const at::Tensor& fake_x0, double eps,
                     const char* op) {
  check_float_tensor(x, op, "x");
  check_float_tensor(real_x0, op, "real_x0");
  check_float_tensor(fake_x0, op, "fake_x0");
  const at::Tensor* others[2] = {&real_x0, &fake_x0};
  const char* names[2] = {"real_x0", "fake_x0"};
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& t = *others[k];
    TORCH_CHECK_VALUE(t.size(0) == x.size(0), op, ": batch size mismatch: x has B=", x.size(0), " but ", names[k],
                      " has B=", t.size(0));
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": shape mismatch: expected ", names[k], " of shape ",
                      shape_str(x), " (like x), got ", shape_str(t));
    TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": dtype mismatch: expected ", names[k], " of dtype ",
                      x.scalar_type(), " (like x), got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": device mismatch: expected ", names[k], " on ", x.device(),
                      " (like x), got ", t.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": expected a finite eps >= 0, got ", eps);
}

at::Tensor dm_grad_ext(const at::Tensor& x, const at::Tensor& real_x0, const at::Tensor& fake_x0, double eps) {
  check_dm_inputs(x, real_x0, fake_x0, eps, "dmd2::dm_grad_ext");
  at::Tensor g = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor xs = with_contiguous_samples(x);
  const at::Tensor rs = with_contiguous_samples(real_x0);
  const at::Tensor fs = with_contiguous_samples(fake_x0);
  if (x.is_cuda()) {
#ifdef DMD2_WITH_CUDA
    dm_grad_cuda(xs, rs, fs, eps, g);
#endif
  } else {
    dm_grad_cpu(xs, rs, fs, eps, g);
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor> dm_loss_ext(const at::Tensor& x, const at::Tensor& real_x0,
                                               const at::Tensor& fake_x0, double eps) {
  // 0.5 * mse(x, x - g) with mean reduction == 0.5 * mean(g^2), accumulated in float32.
  at::Tensor g = dm_grad_ext(x, real_x0, fake_x0, eps);
  at::Tensor loss = at::mean(at::square(g.to(at::kFloat))) * 0.5;
  return std::make_tuple(loss, g);
}

at::Tensor noise_add_ext(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, int64_t seed,
                         int64_t offset) {
  const char* op = "dmd2::noise_add_ext";
  check_float_tensor(x0, op, "x0");
  const int64_t batch = x0.size(0);
  const at::Tensor* coefs[2] = {&alpha, &sigma};
  const char* names[2] = {"alpha", "sigma"};
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& t = *coefs[k];
    TORCH_CHECK_VALUE(t.defined(), op, ": ", names[k], " is an undefined tensor");
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, op, ": expected ", names[k], " of shape (", batch,
                      ",) (one value per sample of x0), got ", shape_str(t));
    TORCH_CHECK_VALUE(t.is_floating_point(), op, ": expected a floating-point ", names[k], ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x0.device(), op, ": device mismatch: expected ", names[k], " on ", x0.device(),
                      " (like x0), got ", t.device());
  }
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must lie in [0, 2**63), got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must lie in [0, 2**63), got ", offset);
  TORCH_CHECK_VALUE(x0.numel() <= std::numeric_limits<int64_t>::max() - offset, op,
                    ": offset + numel must not exceed 2**63, got offset=", offset, " with ", x0.numel(), " elements");

  at::Tensor out = at::empty(x0.sizes(), x0.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor xs = with_contiguous_samples(x0);
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  const at::Tensor s = sigma.to(at::kFloat).contiguous();
  if (x0.is_cuda()) {
#ifdef DMD2_WITH_CUDA
    noise_add_cuda(xs, a, s, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out);
#endif
  } else {
    noise_add_cpu(xs, a, s, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dmd2, m) {
  m.set_python_module("dmd2.kernels.cuda");
  m.def("dm_grad_ext(Tensor x, Tensor real_x0, Tensor fake_x0, float eps=1e-06) -> Tensor");
  m.def("dm_loss_ext(Tensor x, Tensor real_x0, Tensor fake_x0, float eps=1e-06) -> (Tensor, Tensor)");
  m.def("noise_add_ext(Tensor x0, Tensor alpha, Tensor sigma, int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(dmd2, CPU, m) {
  m.impl("dm_grad_ext", &dm_grad_ext);
  m.impl("dm_loss_ext", &dm_loss_ext);
  m.impl("noise_add_ext", &noise_add_ext);
}

#ifdef DMD2_WITH_CUDA
TORCH_LIBRARY_IMPL(dmd2, CUDA, m) {
  m.impl("dm_grad_ext", &dm_grad_ext);
  m.impl("dm_loss_ext", &dm_loss_ext);
  m.impl("noise_add_ext", &noise_add_ext);
}
#endif

}  // namespace dmd2

// 2-D float32 convolutions (NHWC images, HWIO kernels) and both their gradients on
// oneDNN, as XLA FFI handlers: the kernels PyTorch trains with on CPU.
//
// Built on first use by smallfx/models/onednn.py against the onednn-cpu-gomp wheel.
// Each handler looks its primitive up by shapes, strides and padding (creating a
// primitive descriptor takes longer than a small layer runs), converts the kernel
// between HWIO and the layout oneDNN's primitive chose, and runs it.
//
// A call given several threads runs on a thread of this library's own, one per XLA
// device. With the GNU OpenMP runtime, every thread that opens a parallel region
// keeps a team of its own for life: calls made from XLA's worker threads would grow
// a pool of (cores - 1) threads per worker, cores^2 threads on a large machine,
// contending for the cores. With one thread per device there is one team per
// device, of the size the caller gives (its share of the cores), and a device's
// calls run one at a time. Devices run side by side: seeds laid over CPU devices
// (smallfx.train). A call given one thread needs no team, so it runs on XLA's
// calling thread: handing it to another thread and back cost 8 SmallCNN seeds on 2
// devices of 2 cores x1.1 in step time (experiments/bench/README.md, change 13).

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <omp.h>
#include <string>
#include <tuple>
#include <thread>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind : int64_t { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

// Process-lifetime objects are leaked, not destroyed at exit, where an XLA thread
// may still be inside a call.
dnnl::engine& Engine() {
  static auto* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

class Worker {
 public:
  Worker() : thread_([this] { Loop(); }) {}

  // Runs task on the worker thread and waits for it; rethrows what it throws.
  void Run(std::function<void()> task) {
    std::packaged_task<void()> job(std::move(task));
    std::future<void> done = job.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(job));
    }
    ready_.notify_one();
    done.get();
  }

 private:
  void Loop() {
    for (;;) {
      std::packaged_task<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::packaged_task<void()>> queue_;
  std::thread thread_;
};

Worker& WorkerFor(int32_t device) {
  static auto* mutex = new std::mutex();
  static auto* workers = new std::map<int32_t, std::unique_ptr<Worker>>();
  std::lock_guard<std::mutex> lock(*mutex);
  auto& worker = (*workers)[device];
  if (!worker) worker = std::make_unique<Worker>();
  return *worker;
}

// oneDNN names dimensions (N, C, H, W) and (O, I, H, W) whatever the memory order.
memory::dims Image(ffi::Span<const int64_t> nhwc) {
  return {nhwc[0], nhwc[3], nhwc[1], nhwc[2]};
}
memory::dims Kernel(ffi::Span<const int64_t> hwio) {
  return {hwio[3], hwio[2], hwio[0], hwio[1]};
}

struct Primitive {
  dnnl::primitive run;
  memory::desc kernel;        // the layout the primitive wants the kernel (gradient) in
  memory::desc plain_kernel;  // HWIO
  memory::desc scratchpad;
};

using Key = std::tuple<int64_t, memory::dims, memory::dims, memory::dims, memory::dims,
                       memory::dims, memory::dims>;

// Each calling thread (a worker, or an XLA thread for one-thread calls) keeps its
// own primitives, made for its number of threads.
const Primitive& Lookup(Kind kind, const memory::dims& x, const memory::dims& w,
                        const memory::dims& y, const memory::dims& strides,
                        const memory::dims& pad_lo, const memory::dims& pad_hi) {
  static thread_local auto* cache = new std::map<Key, std::unique_ptr<Primitive>>();
  auto& slot = (*cache)[Key(kind, x, w, y, strides, pad_lo, pad_hi)];
  if (slot) return *slot;

  const auto f32 = memory::data_type::f32;
  memory::desc image(x, f32, tag::nhwc), out(y, f32, tag::nhwc);
  memory::desc any_kernel(w, f32, tag::any), plain_kernel(w, f32, tag::hwio);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  // The gradients' descriptors take the forward one as a hint.
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      image, any_kernel, out, strides, pad_lo, pad_hi, attr);
  auto made = std::make_unique<Primitive>();
  made->plain_kernel = plain_kernel;
  if (kind == kForward) {
    made->run = dnnl::convolution_forward(forward);
    made->kernel = forward.weights_desc();
    made->scratchpad = forward.scratchpad_desc();
  } else if (kind == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, image, any_kernel, out, strides,
        pad_lo, pad_hi, forward, attr);
    made->run = dnnl::convolution_backward_data(pd);
    made->kernel = pd.weights_desc();
    made->scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, image, any_kernel, out, strides,
        pad_lo, pad_hi, forward, attr);
    made->run = dnnl::convolution_backward_weights(pd);
    made->kernel = pd.diff_weights_desc();
    made->scratchpad = pd.scratchpad_desc();
  }
  slot = std::move(made);
  return *slot;
}

void Execute(Kind kind, float* x, ffi::Span<const int64_t> x_dims, float* w,
             ffi::Span<const int64_t> w_dims, float* y, ffi::Span<const int64_t> y_dims,
             const memory::dims& strides, const memory::dims& pad_lo,
             const memory::dims& pad_hi) {
  const Primitive& p =
      Lookup(kind, Image(x_dims), Kernel(w_dims), Image(y_dims), strides, pad_lo, pad_hi);
  dnnl::engine& engine = Engine();
  dnnl::stream stream(engine);
  const auto f32 = memory::data_type::f32;
  memory image({Image(x_dims), f32, tag::nhwc}, engine, x);
  memory out({Image(y_dims), f32, tag::nhwc}, engine, y);
  memory plain_kernel(p.plain_kernel, engine, w);
  const bool convert = p.kernel != p.plain_kernel;
  memory kernel = convert ? memory(p.kernel, engine) : plain_kernel;
  memory scratchpad(p.scratchpad, engine);
  if (convert && kind != kKernelGrad) {
    dnnl::reorder(plain_kernel, kernel).execute(stream, plain_kernel, kernel);
  }
  if (kind == kForward) {
    p.run.execute(stream, {{DNNL_ARG_SRC, image}, {DNNL_ARG_WEIGHTS, kernel},
                           {DNNL_ARG_DST, out}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (kind == kInputGrad) {
    p.run.execute(stream, {{DNNL_ARG_DIFF_DST, out}, {DNNL_ARG_WEIGHTS, kernel},
                           {DNNL_ARG_DIFF_SRC, image}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    p.run.execute(stream, {{DNNL_ARG_SRC, image}, {DNNL_ARG_DIFF_DST, out},
                           {DNNL_ARG_DIFF_WEIGHTS, kernel}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (convert) dnnl::reorder(kernel, plain_kernel).execute(stream, kernel, plain_kernel);
  }
  stream.wait();
}

// x, w and y are (N, H, W, C), (KH, KW, I, O) and (N, H', W', O) buffers; which of
// them is read and which written depends on the kind.
ffi::Error Run(Kind kind, float* x, ffi::Span<const int64_t> x_dims, float* w,
               ffi::Span<const int64_t> w_dims, float* y, ffi::Span<const int64_t> y_dims,
               int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
               int64_t pad_left, int64_t pad_right, int32_t device, int64_t threads) {
  // No exception may cross into XLA, which would terminate the process.
  try {
    auto call = [&] {
      omp_set_num_threads(static_cast<int>(threads));
      Execute(kind, x, x_dims, w, w_dims, y, y_dims, {stride_h, stride_w},
              {pad_top, pad_left}, {pad_bottom, pad_right});
    };
    if (threads == 1) {
      call();
    } else {
      WorkerFor(device).Run(call);
    }
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN convolution failed");
  }
  return ffi::Error::Success();
}

using F32 = ffi::BufferR4<ffi::F32>;
using OutF32 = ffi::ResultBufferR4<ffi::F32>;

ffi::Error Forward(F32 x, F32 w, OutF32 y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr, int32_t device, int64_t threads) {
  return Run(kForward, x.typed_data(), x.dimensions(), w.typed_data(), w.dimensions(),
             y->typed_data(), y->dimensions(), sh, sw, pt, pb, pl, pr, device, threads);
}

ffi::Error InputGrad(F32 dy, F32 w, OutF32 dx, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pb, int64_t pl, int64_t pr, int32_t device, int64_t threads) {
  return Run(kInputGrad, dx->typed_data(), dx->dimensions(), w.typed_data(), w.dimensions(),
             dy.typed_data(), dy.dimensions(), sh, sw, pt, pb, pl, pr, device, threads);
}

ffi::Error KernelGrad(F32 x, F32 dy, OutF32 dw, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, int32_t device, int64_t threads) {
  return Run(kKernelGrad, x.typed_data(), x.dimensions(), dw->typed_data(), dw->dimensions(),
             dy.typed_data(), dy.dimensions(), sh, sw, pt, pb, pl, pr, device, threads);
}

template <typename B>
auto Geometry(B binding) {
  return std::move(binding).template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right")
      .template Ctx<ffi::DeviceOrdinal>()
      .template Attr<int64_t>("threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallfxConvForward, Forward,
                              Geometry(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallfxConvInputGrad, InputGrad,
                              Geometry(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallfxConvKernelGrad, KernelGrad,
                              Geometry(ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()));

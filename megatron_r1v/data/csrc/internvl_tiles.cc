// DALI CPU operator `r1v.internvl_tiles`: InternVL tiles of decoded RGB images.
//
// Inputs: 0 = images, HWC uint8 with 3 channels; 1 = grid, int32 [2] = (cols, rows) per sample.
// Output: float32 [F, 3, S, S] ("FCHW"), F = cols * rows tiles in row-major order, plus the
// S x S thumbnail when `thumbnail` is set and there is more than one tile; each pixel value v of
// channel c becomes lut[c * 256 + v] (the caller passes the reference normalization's table).
//
// Why a plugin instead of fn.resize: DALI's CPU resize is a float separable filter that costs
// about twice Pillow's time per output element on x86 CPUs, and it clamps filter taps at the
// borders where Pillow truncates and renormalizes the window. This kernel reproduces Pillow's
// 8-bit BICUBIC resampling (Keys a = -0.5, 22 fractional bits, horizontal pass first with a
// uint8 intermediate, identity passes skipped) bit for bit, and writes the normalized planar
// tiles directly, so no full-size grid image, transpose or concatenation is materialized.
//
// Build: megatron_r1v/data/dali_plugin.py compiles this file against the installed DALI.
// Floating-point contraction must stay off (-ffp-contract=off) so that the double-precision
// weight computation rounds exactly as Pillow's baseline-x86-64 build does.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dali/pipeline/operator/operator.h"

namespace megatron_r1v {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's fixed-point precision for 8-bit images
constexpr int kChannels = 3;
constexpr int kLutSize = 256;

// Keys' cubic convolution kernel with a = -0.5 (Pillow's BICUBIC, support 2).
inline double BicubicWeight(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// One axis of a resize: output i reads inputs first[i] .. first[i] + count[i] - 1 with
// fixed-point weights weights[i * max_taps + k].
struct AxisWeights {
  int max_taps = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights;
};

AxisWeights ComputeAxisWeights(int in_size, int out_size) {
  AxisWeights axis;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filter_scale = std::max(scale, 1.0);  // widen the kernel when downscaling
  const double support = 2.0 * filter_scale;
  const double inv_filter_scale = 1.0 / filter_scale;
  axis.max_taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  axis.first.resize(out_size);
  axis.count.resize(out_size);
  axis.weights.assign(static_cast<size_t>(out_size) * axis.max_taps, 0);
  std::vector<double> w(axis.max_taps);
  for (int i = 0; i < out_size; i++) {
    const double center = (i + 0.5) * scale;
    // Truncation toward zero, then clipping to the image: Pillow's window, which drops taps
    // outside the image and renormalizes the rest (no border replication).
    int lo = static_cast<int>(center - support + 0.5);
    if (lo < 0) lo = 0;
    int hi = static_cast<int>(center + support + 0.5);
    if (hi > in_size) hi = in_size;
    const int n = hi - lo;
    double total = 0.0;
    for (int k = 0; k < n; k++) {
      w[k] = BicubicWeight((k + lo - center + 0.5) * inv_filter_scale);
      total += w[k];
    }
    int32_t *fixed = &axis.weights[static_cast<size_t>(i) * axis.max_taps];
    for (int k = 0; k < n; k++) {
      const double v = total != 0.0 ? w[k] / total : w[k];
      fixed[k] = static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits)
                                            : 0.5 + v * (1 << kPrecisionBits));
    }
    axis.first[i] = lo;
    axis.count[i] = n;
  }
  return axis;
}

inline int32_t Clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;  // arithmetic shift: floor, as Pillow's lookup
  return v < 0 ? 0 : (v > 255 ? 255 : v);
}

// Reused per worker thread: the intermediate image and one row of accumulators.
struct Scratch {
  std::vector<uint8_t> tmp;
  std::vector<uint8_t> rows;
  std::vector<int32_t> acc;
};

// Accumulates `n` taps of the three interleaved channels; called with a literal n below, so
// the common tap counts inline into fixed-length, unrolled loops.
inline void Taps3(const uint8_t *__restrict p, const int32_t *__restrict k, int n, int32_t *s) {
  for (int t = 0; t < n; t++) {
    s[0] += p[t * kChannels + 0] * k[t];
    s[1] += p[t * kChannels + 1] * k[t];
    s[2] += p[t * kChannels + 2] * k[t];
  }
}

// One scratch per worker thread, shared by the grid and thumbnail tasks it runs.
Scratch &WorkerScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// One interleaved RGB row resampled horizontally into three planar rows (or only
// de-interleaved when the width does not change). Tap counts 4-8 are unrolled: they cover
// upscaling (4-5 taps) and downscaling up to 2x, the common cases.
void HorizontalRow(const uint8_t *__restrict in, int w, const AxisWeights *ax, int out_w,
                   uint8_t *__restrict out0, uint8_t *__restrict out1, uint8_t *__restrict out2) {
  if (ax == nullptr) {
    for (int x = 0; x < w; x++) {
      out0[x] = in[x * kChannels + 0];
      out1[x] = in[x * kChannels + 1];
      out2[x] = in[x * kChannels + 2];
    }
    return;
  }
  for (int x = 0; x < out_w; x++) {
    const int32_t *k = &ax->weights[static_cast<size_t>(x) * ax->max_taps];
    const uint8_t *p = in + ax->first[x] * kChannels;
    int32_t s[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1)};
    switch (const int n = ax->count[x]) {
      case 4: Taps3(p, k, 4, s); break;
      case 5: Taps3(p, k, 5, s); break;
      case 6: Taps3(p, k, 6, s); break;
      case 7: Taps3(p, k, 7, s); break;
      case 8: Taps3(p, k, 8, s); break;
      default: Taps3(p, k, n, s);
    }
    out0[x] = static_cast<uint8_t>(Clip8(s[0]));
    out1[x] = static_cast<uint8_t>(Clip8(s[1]));
    out2[x] = static_cast<uint8_t>(Clip8(s[2]));
  }
}

// Vertical resampling of output row y: `num` contiguous values from the input rows the
// weights name (row r starts at rows + r * stride), clipped to uint8.
inline void VerticalRow(const uint8_t *__restrict rows, size_t stride, const AxisWeights &ay, int y,
                        int num, int32_t *__restrict acc, uint8_t *__restrict out) {
  const int32_t *k = &ay.weights[static_cast<size_t>(y) * ay.max_taps];
  const uint8_t *in = rows + static_cast<size_t>(ay.first[y]) * stride;
  std::fill(acc, acc + num, 1 << (kPrecisionBits - 1));
  for (int t = 0, n = ay.count[y]; t < n; t++) {
    const uint8_t *__restrict in_row = in + static_cast<size_t>(t) * stride;
    const int32_t weight = k[t];
    for (int x = 0; x < num; x++) acc[x] += in_row[x] * weight;
  }
  for (int x = 0; x < num; x++) out[x] = static_cast<uint8_t>(Clip8(acc[x]));
}

// Output row y (three planar uint8 rows of out_w values) into its S-wide tile rows.
inline void WriteTileRow(const uint8_t *const planar[kChannels], int y, int out_w, int S,
                         const float *lut, float *frames) {
  const int cols = out_w / S;
  const size_t frame_size = static_cast<size_t>(kChannels) * S * S;
  float *row_base = frames + static_cast<size_t>(y / S) * cols * frame_size;
  for (int c = 0; c < kChannels; c++) {
    const float *__restrict channel_lut = lut + c * kLutSize;
    for (int tx = 0; tx < cols; tx++) {
      float *__restrict dst = row_base + tx * frame_size + (static_cast<size_t>(c) * S + y % S) * S;
      const uint8_t *__restrict s = planar[c] + tx * S;
      for (int x = 0; x < S; x++) dst[x] = channel_lut[s[x]];
    }
  }
}

// Resizes a w x h interleaved RGB image to out_w x out_h (multiples of S) exactly as Pillow's
// Image.resize(BICUBIC), writing it as (out_w / S) x (out_h / S) row-major S x S tiles into
// consecutive frames [3, S, S] starting at `frames`, each value mapped through `lut`.
// Pillow resamples horizontally first, except (since Pillow 13, when `vertical_first_rule`
// is set) when the height shrinks by more than twice as many pixels as the width does.
void ResizeIntoTiles(const uint8_t *src, int w, int h, int out_w, int out_h, int S,
                     bool vertical_first_rule, const float *lut, float *frames, Scratch *scratch) {
  const bool horizontal = out_w != w, vertical = out_h != h;
  AxisWeights ax, ay;
  if (horizontal) ax = ComputeAxisWeights(w, out_w);
  if (vertical) ay = ComputeAxisWeights(h, out_h);
  const size_t src_stride = static_cast<size_t>(w) * kChannels;
  scratch->rows.resize(static_cast<size_t>(out_w) * kChannels);
  uint8_t *planar_row[kChannels] = {scratch->rows.data(), scratch->rows.data() + out_w,
                                    scratch->rows.data() + 2 * out_w};

  if (vertical && vertical_first_rule && out_h < h && h - out_h > 2 * (w - out_w)) {
    // Vertical pass into an interleaved out_h x w intermediate, then each row horizontally.
    scratch->tmp.resize(static_cast<size_t>(out_h) * src_stride);
    scratch->acc.resize(src_stride);
    for (int y = 0; y < out_h; y++)
      VerticalRow(src, src_stride, ay, y, static_cast<int>(src_stride), scratch->acc.data(),
                  scratch->tmp.data() + y * src_stride);
    for (int y = 0; y < out_h; y++) {
      HorizontalRow(scratch->tmp.data() + y * src_stride, w, horizontal ? &ax : nullptr, out_w,
                    planar_row[0], planar_row[1], planar_row[2]);
      WriteTileRow(planar_row, y, out_w, S, lut, frames);
    }
    return;
  }

  // Horizontal pass over the source rows the vertical pass reads, into three planes.
  int row0 = 0, num_rows = h;
  if (vertical) {
    row0 = ay.first[0];
    num_rows = ay.first[out_h - 1] + ay.count[out_h - 1] - row0;
  }
  const size_t plane_size = static_cast<size_t>(num_rows) * out_w;
  scratch->tmp.resize(plane_size * kChannels);
  uint8_t *planes = scratch->tmp.data();
  for (int r = 0; r < num_rows; r++)
    HorizontalRow(src + (row0 + r) * src_stride, w, horizontal ? &ax : nullptr, out_w,
                  planes + r * out_w, planes + plane_size + r * out_w,
                  planes + 2 * plane_size + r * out_w);
  if (!vertical) {
    for (int y = 0; y < out_h; y++) {
      const uint8_t *rows[kChannels] = {planes + y * out_w, planes + plane_size + y * out_w,
                                        planes + 2 * plane_size + y * out_w};
      WriteTileRow(rows, y, out_w, S, lut, frames);
    }
    return;
  }
  for (int i = 0; i < out_h; i++) ay.first[i] -= row0;
  scratch->acc.resize(out_w);
  for (int y = 0; y < out_h; y++) {
    for (int c = 0; c < kChannels; c++)
      VerticalRow(planes + c * plane_size, out_w, ay, y, out_w, scratch->acc.data(), planar_row[c]);
    WriteTileRow(planar_row, y, out_w, S, lut, frames);
  }
}

class InternvlTiles : public ::dali::Operator<::dali::CPUBackend> {
 public:
  explicit InternvlTiles(const ::dali::OpSpec &spec)
      : ::dali::Operator<::dali::CPUBackend>(spec),
        tile_size_(spec.GetArgument<int>("tile_size")),
        thumbnail_(spec.GetArgument<bool>("thumbnail")),
        vertical_first_rule_(spec.GetArgument<bool>("vertical_first_rule")),
        lut_(spec.GetRepeatedArgument<float>("lut")) {
    DALI_ENFORCE(tile_size_ > 0, "internvl_tiles: tile_size must be positive, got " +
                                     std::to_string(tile_size_));
    DALI_ENFORCE(lut_.size() == static_cast<size_t>(kChannels * kLutSize),
                 "internvl_tiles: lut must hold 3 x 256 values, got " + std::to_string(lut_.size()));
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const auto &images = ws.Input<::dali::CPUBackend>(0);
    const auto &grids = ws.Input<::dali::CPUBackend>(1);
    DALI_ENFORCE(images.type() == DALI_UINT8, "internvl_tiles: images must be uint8");
    DALI_ENFORCE(grids.type() == DALI_INT32, "internvl_tiles: grid must be int32");
    const int n = images.num_samples();
    DALI_ENFORCE(grids.num_samples() == n, "internvl_tiles: one grid per image");
    const int S = tile_size_;
    ::dali::TensorListShape<4> shape(n);
    for (int i = 0; i < n; i++) {
      const auto image_shape = images.shape()[i];
      DALI_ENFORCE(image_shape.size() == 3 && image_shape[2] == kChannels && image_shape[0] > 0 &&
                       image_shape[1] > 0,
                   "internvl_tiles: sample " + std::to_string(i) +
                       " is not a non-empty HWC image with 3 channels");
      DALI_ENFORCE(grids.shape()[i].num_elements() == 2,
                   "internvl_tiles: grid of sample " + std::to_string(i) + " must be [cols, rows]");
      const int32_t *grid = grids.tensor<int32_t>(i);
      DALI_ENFORCE(grid[0] > 0 && grid[1] > 0,
                   "internvl_tiles: grid of sample " + std::to_string(i) + " must be positive");
      const int64_t tiles = static_cast<int64_t>(grid[0]) * grid[1];
      shape.set_tensor_shape(i, {tiles + (thumbnail_ && tiles > 1 ? 1 : 0), kChannels, S, S});
    }
    output_desc.resize(1);
    output_desc[0] = {shape, DALI_FLOAT};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &images = ws.Input<::dali::CPUBackend>(0);
    const auto &grids = ws.Input<::dali::CPUBackend>(1);
    auto &output = ws.Output<::dali::CPUBackend>(0);
    output.SetLayout("FCHW");
    auto &pool = ws.GetThreadPool();
    const int S = tile_size_;
    const size_t frame_size = static_cast<size_t>(kChannels) * S * S;
    for (int i = 0; i < images.num_samples(); i++) {
      const auto image_shape = images.shape()[i];
      const int h = image_shape[0], w = image_shape[1];
      const uint8_t *src = images.tensor<uint8_t>(i);
      const int32_t *grid = grids.tensor<int32_t>(i);
      const int cols = grid[0], rows = grid[1];
      float *frames = output.mutable_tensor<float>(i);
      const float *lut = lut_.data();
      const bool vertical_first = vertical_first_rule_;
      // Grid and thumbnail are separate tasks (disjoint frames), which balances the threads
      // better than one task per image; the priority is the output size.
      pool.AddWork([=](int) {
        ResizeIntoTiles(src, w, h, cols * S, rows * S, S, vertical_first, lut, frames, &WorkerScratch());
      }, static_cast<int64_t>(cols) * rows * S * S);
      if (thumbnail_ && cols * rows > 1) {
        pool.AddWork([=](int) {
          ResizeIntoTiles(src, w, h, S, S, S, vertical_first, lut, frames + cols * rows * frame_size,
                          &WorkerScratch());
        }, static_cast<int64_t>(S) * S);
      }
    }
    pool.RunAll();
  }

 private:
  int tile_size_;
  bool thumbnail_;
  bool vertical_first_rule_;
  std::vector<float> lut_;
};

}  // namespace megatron_r1v

DALI_REGISTER_OPERATOR(r1v__InternvlTiles, ::megatron_r1v::InternvlTiles, ::dali::CPU);

DALI_SCHEMA(r1v__InternvlTiles)
    .DocStr(R"(InternVL dynamic-tiling tiles of decoded RGB images with Pillow-exact BICUBIC
resampling; values mapped through a per-channel lookup table (megatron-r1v).)")
    .NumInput(2)
    .NumOutput(1)
    .AddOptionalArg("tile_size", "Tile side S in pixels.", 448)
    .AddOptionalArg("thumbnail", "Append an S x S thumbnail of the whole image when the grid has more than one tile.", true)
    .AddOptionalArg("vertical_first_rule", "Resample vertically first when the height shrinks by more than twice as many pixels as the width (Pillow >= 13); otherwise always horizontally first (older Pillow).", true)
    .AddArg("lut", "3 x 256 output values: channel c, pixel value v -> lut[c * 256 + v].", DALI_FLOAT_VEC);

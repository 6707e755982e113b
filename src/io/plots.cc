#include "foldcube/plots.h"

#include <cairo.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>

#include "io/io_util.h"

namespace fc {
namespace {

struct Rgb {
  double r, g, b;
};

// Linear interpolation through evenly spaced colour stops, t in [0, 1].
Rgb colormap(const std::vector<Rgb>& stops, double t) {
  t = std::clamp(t, 0.0, 1.0) * (stops.size() - 1);
  const size_t i = std::min(static_cast<size_t>(t), stops.size() - 2);
  const double f = t - i;
  return {stops[i].r + f * (stops[i + 1].r - stops[i].r),
          stops[i].g + f * (stops[i + 1].g - stops[i].g),
          stops[i].b + f * (stops[i + 1].b - stops[i].b)};
}

// Dark green (confident, low error) to white (high error), as the AlphaFold database shows PAE.
const std::vector<Rgb> kPaeStops = {
    {0.0, 0.27, 0.11}, {0.13, 0.55, 0.27}, {0.45, 0.77, 0.46}, {0.78, 0.91, 0.75}, {1.0, 1.0, 1.0}};
// Identity colours for the coverage plot: low identity red through yellow, green, to blue.
const std::vector<Rgb> kIdentityStops = {
    {0.85, 0.1, 0.1}, {0.95, 0.6, 0.1}, {0.95, 0.9, 0.2}, {0.3, 0.75, 0.3}, {0.1, 0.4, 0.85}};

struct Canvas {
  std::unique_ptr<cairo_surface_t, void (*)(cairo_surface_t*)> surface{nullptr,
                                                                       cairo_surface_destroy};
  std::unique_ptr<cairo_t, void (*)(cairo_t*)> cr{nullptr, cairo_destroy};
  Canvas(int w, int h) {
    surface.reset(cairo_image_surface_create(CAIRO_FORMAT_RGB24, w, h));
    cr.reset(cairo_create(surface.get()));
    cairo_set_source_rgb(cr.get(), 1, 1, 1);
    cairo_paint(cr.get());
    cairo_select_font_face(cr.get(), "sans-serif", CAIRO_FONT_SLANT_NORMAL,
                           CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(cr.get(), 12);
  }
  cairo_t* c() const { return cr.get(); }
  // PNG to a temporary file in the target directory, then renamed over the target.
  Status save(const std::string& path) {
    if (cairo_status(cr.get()) != CAIRO_STATUS_SUCCESS)
      return Status::Internal(std::string("cairo: ") +
                              cairo_status_to_string(cairo_status(cr.get())));
    cairo_surface_flush(surface.get());
    return io::write_file_atomic(path, [&](FILE* f) {
      auto put = [](void* out, const unsigned char* data, unsigned int n) {
        return std::fwrite(data, 1, n, static_cast<FILE*>(out)) == n ? CAIRO_STATUS_SUCCESS
                                                                     : CAIRO_STATUS_WRITE_ERROR;
      };
      const cairo_status_t st = cairo_surface_write_to_png_stream(surface.get(), put, f);
      if (st != CAIRO_STATUS_SUCCESS)
        return Status::IOError("cannot write " + path + ": " + cairo_status_to_string(st));
      return Status::OK();
    });
  }
};

void text(cairo_t* cr, double x, double y, const std::string& s, double ax = 0.5, double ay = 0.5,
          double angle = 0) {
  cairo_text_extents_t e;
  cairo_text_extents(cr, s.c_str(), &e);
  cairo_save(cr);
  cairo_translate(cr, x, y);
  cairo_rotate(cr, angle);
  cairo_move_to(cr, -e.x_bearing - ax * e.width, -e.y_bearing - ay * e.height);
  cairo_set_source_rgb(cr, 0, 0, 0);
  cairo_show_text(cr, s.c_str());
  cairo_restore(cr);
}

// A "nice" tick step for a span covered by about n ticks.
double tick_step(double span, int n) {
  const double raw = span / n, p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * p >= raw) return m * p;
  return 10 * p;
}

std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof(b), "%g", v);
  return b;
}

// Axis box at (x0, y0, w, h) with ticks for data ranges [xa, xb] and [ya, yb] (y up unless
// flip_y) and labels.
void axes(cairo_t* cr, double x0, double y0, double w, double h, double xa, double xb, double ya,
          double yb, bool flip_y, const std::string& xlabel, const std::string& ylabel) {
  cairo_set_source_rgb(cr, 0, 0, 0);
  cairo_set_line_width(cr, 1);
  cairo_rectangle(cr, x0, y0, w, h);
  cairo_stroke(cr);
  const double sx = tick_step(xb - xa, 8), sy = tick_step(yb - ya, 6);
  for (double v = std::ceil(xa / sx) * sx; v <= xb + 1e-9; v += sx) {
    const double x = x0 + (v - xa) / (xb - xa) * w;
    cairo_move_to(cr, x, y0 + h);
    cairo_line_to(cr, x, y0 + h + 4);
    cairo_stroke(cr);
    text(cr, x, y0 + h + 12, fmt(v));
  }
  for (double v = std::ceil(ya / sy) * sy; v <= yb + 1e-9; v += sy) {
    const double t = (v - ya) / (yb - ya), y = flip_y ? y0 + t * h : y0 + h - t * h;
    cairo_move_to(cr, x0 - 4, y);
    cairo_line_to(cr, x0, y);
    cairo_stroke(cr);
    text(cr, x0 - 7, y, fmt(v), 1.0, 0.5);
  }
  text(cr, x0 + w / 2, y0 + h + 30, xlabel);
  text(cr, x0 - 42, y0 + h / 2, ylabel, 0.5, 0.5, -M_PI / 2);
}

void colorbar(cairo_t* cr, double x0, double y0, double h, const std::vector<Rgb>& stops, double lo,
              double hi, const std::string& label) {
  for (int k = 0; k < static_cast<int>(h); ++k) {
    const Rgb c = colormap(stops, 1.0 - k / h);
    cairo_set_source_rgb(cr, c.r, c.g, c.b);
    cairo_rectangle(cr, x0, y0 + k, 14, 1);
    cairo_fill(cr);
  }
  cairo_set_source_rgb(cr, 0, 0, 0);
  cairo_rectangle(cr, x0, y0, 14, h);
  cairo_stroke(cr);
  const double s = tick_step(hi - lo, 5);
  for (double v = std::ceil(lo / s) * s; v <= hi + 1e-9; v += s)
    text(cr, x0 + 18, y0 + h - (v - lo) / (hi - lo) * h, fmt(v), 0.0, 0.5);
  text(cr, x0 + 52, y0 + h / 2, label, 0.5, 0.5, M_PI / 2);
}

}  // namespace

Status plot_plddt(const std::string& path, const std::vector<std::vector<float>>& plddt,
                  const std::vector<std::string>& labels) {
  if (plddt.empty() || plddt[0].empty()) return Status::InvalidArgument("plot_plddt: no values");
  const int64_t r = static_cast<int64_t>(plddt[0].size());
  Canvas cv(720, 380);
  cairo_t* cr = cv.c();
  const double x0 = 70, y0 = 30, w = 600, h = 290;
  // AlphaFold confidence bands: very high > 90, confident 70-90, low 50-70, very low < 50.
  const struct {
    double lo, hi;
    Rgb c;
  } bands[] = {{90, 100, {0.0, 0.33, 0.84}},
               {70, 90, {0.40, 0.80, 0.95}},
               {50, 70, {1.0, 0.86, 0.07}},
               {0, 50, {1.0, 0.49, 0.27}}};
  for (const auto& b : bands) {
    cairo_set_source_rgba(cr, b.c.r, b.c.g, b.c.b, 0.25);
    cairo_rectangle(cr, x0, y0 + (100 - b.hi) / 100 * h, w, (b.hi - b.lo) / 100 * h);
    cairo_fill(cr);
  }
  const Rgb line_colors[] = {{0.12, 0.47, 0.71},
                             {1.0, 0.5, 0.05},
                             {0.17, 0.63, 0.17},
                             {0.84, 0.15, 0.16},
                             {0.58, 0.4, 0.74}};
  for (size_t m = 0; m < plddt.size(); ++m) {
    if (static_cast<int64_t>(plddt[m].size()) != r)
      return Status::InvalidArgument("plot_plddt: models have different lengths");
    const Rgb c = line_colors[m % 5];
    cairo_set_source_rgb(cr, c.r, c.g, c.b);
    cairo_set_line_width(cr, 1.5);
    for (int64_t i = 0; i < r; ++i) {
      const double x = x0 + (r > 1 ? static_cast<double>(i) / (r - 1) : 0.5) * w;
      const double y = y0 + (100 - std::clamp(plddt[m][i], 0.0f, 100.0f)) / 100 * h;
      i == 0 ? cairo_move_to(cr, x, y) : cairo_line_to(cr, x, y);
    }
    cairo_stroke(cr);
    if (m < labels.size()) {
      cairo_set_source_rgb(cr, c.r, c.g, c.b);
      cairo_rectangle(cr, x0 + w - 140, y0 + 10 + 16 * m, 12, 3);
      cairo_fill(cr);
      text(cr, x0 + w - 122, y0 + 11 + 16 * m, labels[m], 0.0, 0.5);
    }
  }
  axes(cr, x0, y0, w, h, 1, std::max<double>(r, 2), 0, 100, false, "residue", "pLDDT");
  text(cr, x0 + w / 2, 14, "Predicted lDDT per residue");
  return cv.save(path);
}

Status plot_pae(const std::string& path, const std::vector<float>& pae, int64_t r, float max_pae) {
  if (r < 1 || static_cast<int64_t>(pae.size()) != r * r || !(max_pae > 0))
    return Status::InvalidArgument("plot_pae: PAE must be [r, r] with a positive maximum");
  Canvas cv(560, 480);
  cairo_t* cr = cv.c();
  const double x0 = 70, y0 = 30, side = 400;
  // One pixel per residue pair, scaled to the square with nearest-neighbour sampling.
  auto img = std::unique_ptr<cairo_surface_t, void (*)(cairo_surface_t*)>(
      cairo_image_surface_create(CAIRO_FORMAT_RGB24, static_cast<int>(r), static_cast<int>(r)),
      cairo_surface_destroy);
  unsigned char* data = cairo_image_surface_get_data(img.get());
  const int stride = cairo_image_surface_get_stride(img.get());
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) {
      const Rgb c = colormap(kPaeStops, pae[i * r + j] / max_pae);
      uint32_t* px = reinterpret_cast<uint32_t*>(data + i * stride) + j;
      *px = (static_cast<uint32_t>(c.r * 255) << 16) | (static_cast<uint32_t>(c.g * 255) << 8) |
            static_cast<uint32_t>(c.b * 255);
    }
  cairo_surface_mark_dirty(img.get());
  cairo_save(cr);
  cairo_translate(cr, x0, y0);
  cairo_scale(cr, side / r, side / r);
  cairo_set_source_surface(cr, img.get(), 0, 0);
  cairo_pattern_set_filter(cairo_get_source(cr), CAIRO_FILTER_NEAREST);
  cairo_paint(cr);
  cairo_restore(cr);
  // Cells are centred on their residue numbers.
  axes(cr, x0, y0, side, side, 0.5, r + 0.5, 0.5, r + 0.5, true, "aligned residue",
       "scored residue");
  colorbar(cr, x0 + side + 20, y0, side, kPaeStops, 0, max_pae, "expected position error (A)");
  text(cr, x0 + side / 2, 14, "Predicted aligned error");
  return cv.save(path);
}

Status plot_msa_coverage(const std::string& path, const std::vector<int8_t>& msa, int64_t n,
                         int64_t r, int8_t gap) {
  if (n < 1 || r < 1 || static_cast<int64_t>(msa.size()) != n * r)
    return Status::InvalidArgument("plot_msa_coverage: msa must be [n, r] with n, r >= 1");
  // Identity to the query over the query's non-gap positions; coverage per position.
  std::vector<double> ident(n, 0.0);
  std::vector<int64_t> cover(r, 0);
  int64_t qlen = 0;
  for (int64_t j = 0; j < r; ++j) qlen += msa[j] != gap;
  for (int64_t s = 0; s < n; ++s) {
    int64_t same = 0;
    for (int64_t j = 0; j < r; ++j) {
      const int8_t t = msa[s * r + j];
      same += t != gap && t == msa[j];
      cover[j] += t != gap;
    }
    ident[s] = qlen ? static_cast<double>(same) / qlen : 0.0;
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return ident[a] > ident[b]; });
  Canvas cv(760, 460);
  cairo_t* cr = cv.c();
  const double x0 = 70, y0 = 30, w = 580, h = 360;
  const int rows = static_cast<int>(std::min<int64_t>(n, 4096));  // image rows (bins of rows)
  auto img = std::unique_ptr<cairo_surface_t, void (*)(cairo_surface_t*)>(
      cairo_image_surface_create(CAIRO_FORMAT_RGB24, static_cast<int>(r), rows),
      cairo_surface_destroy);
  unsigned char* data = cairo_image_surface_get_data(img.get());
  const int stride = cairo_image_surface_get_stride(img.get());
  for (int y = 0; y < rows; ++y) {
    const int64_t s = order[static_cast<int64_t>(y) * n / rows];
    const Rgb c = colormap(kIdentityStops, ident[s]);
    for (int64_t j = 0; j < r; ++j) {
      const bool present = msa[s * r + j] != gap;
      uint32_t* px = reinterpret_cast<uint32_t*>(data + y * stride) + j;
      *px = present ? (static_cast<uint32_t>(c.r * 255) << 16) |
                          (static_cast<uint32_t>(c.g * 255) << 8) | static_cast<uint32_t>(c.b * 255)
                    : 0xffffffu;
    }
  }
  cairo_surface_mark_dirty(img.get());
  cairo_save(cr);
  cairo_translate(cr, x0, y0);
  cairo_scale(cr, w / r, h / rows);
  cairo_set_source_surface(cr, img.get(), 0, 0);
  cairo_pattern_set_filter(cairo_get_source(cr), CAIRO_FILTER_NEAREST);
  cairo_paint(cr);
  cairo_restore(cr);
  // Coverage line: rows with a residue at each position, on the same vertical scale (n rows).
  cairo_set_source_rgb(cr, 0, 0, 0);
  cairo_set_line_width(cr, 1.5);
  for (int64_t j = 0; j < r; ++j) {
    const double x = x0 + (j + 0.5) / r * w, y = y0 + h - static_cast<double>(cover[j]) / n * h;
    j == 0 ? cairo_move_to(cr, x, y) : cairo_line_to(cr, x, y);
  }
  cairo_stroke(cr);
  axes(cr, x0, y0, w, h, 0.5, r + 0.5, 0, static_cast<double>(n), false, "position", "sequences");
  colorbar(cr, x0 + w + 20, y0, h, kIdentityStops, 0, 1, "identity to query");
  text(cr, x0 + w / 2, 14, "Sequence coverage (" + std::to_string(n) + " sequences)");
  return cv.save(path);
}

}  // namespace fc

// Unit tests of the tri-plane sampling math shared by the CPU and CUDA kernels.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "tests/expect.h"
#include "triplane/triplane_math.h"

using namespace pyface;
using pyface_test::near;
using namespace pyface::triplane;

int main() {
  // plane axes: (x, y), (x, z), (z, y) and EG3D's (x, y), (x, z), (z, x)
  EXPECT(axis_u(PlaneAxes::XY_XZ_ZY, 0) == 0 && axis_v(PlaneAxes::XY_XZ_ZY, 0) == 1);
  EXPECT(axis_u(PlaneAxes::XY_XZ_ZY, 1) == 0 && axis_v(PlaneAxes::XY_XZ_ZY, 1) == 2);
  EXPECT(axis_u(PlaneAxes::XY_XZ_ZY, 2) == 2 && axis_v(PlaneAxes::XY_XZ_ZY, 2) == 1);
  EXPECT(axis_u(PlaneAxes::EG3D, 2) == 2 && axis_v(PlaneAxes::EG3D, 2) == 0);

  // unnormalize follows grid_sample: -1 -> -0.5 and 1 -> size - 0.5 (align_corners=False),
  // -1 -> 0 and 1 -> size - 1 (align_corners=True)
  EXPECT(near(unnormalize(-1.0, 8, false), -0.5));
  EXPECT(near(unnormalize(1.0, 8, false), 7.5));
  EXPECT(near(unnormalize(-1.0, 8, true), 0.0));
  EXPECT(near(unnormalize(1.0, 8, true), 7.0));

  // weights sum to one and reproduce the point when interpolating the coordinates
  for (double u = -1.3; u <= 1.3; u += 0.07) {
    for (double v = -1.2; v <= 1.2; v += 0.09) {
      const Taps<double> t = bilinear_taps(u, v, 7, 5, false);
      double s = 0, x = 0, y = 0;
      for (int k = 0; k < 4; ++k) {
        s += t.w[k];
        x += t.w[k] * double(t.x0 + (k & 1));
        y += t.w[k] * double(t.y0 + (k >> 1));
      }
      EXPECT(near(s, 1.0, 1e-12));
      if (t.ix > -2 && t.ix < 8 && t.iy > -2 && t.iy < 6) {
        EXPECT(near(x, t.ix, 1e-12) && near(y, t.iy, 1e-12));
      }
      // weight derivatives match finite differences
      double dwdx[4], dwdy[4];
      weight_grads(t, dwdx, dwdy);
      const double h = 1e-7;
      const Taps<double> tx = bilinear_taps(u + h * 2.0 / 7.0, v, 7, 5, false);
      if (tx.x0 == t.x0 && tx.y0 == t.y0) {
        for (int k = 0; k < 4; ++k) EXPECT(near((tx.w[k] - t.w[k]) / (tx.ix - t.ix), dwdx[k], 1e-5));
      }
    }
  }

  // far outside: clamped, every tap invalid, no undefined integer conversion
  const Taps<float> far = bilinear_taps(1e30f, -1e30f, 16, 16, false);
  EXPECT(!far.valid[0] && !far.valid[1] && !far.valid[2] && !far.valid[3]);
  const Taps<float> inf = bilinear_taps(INFINITY, 0.f, 16, 16, true);
  EXPECT(!inf.valid[0] && !inf.valid[1] && !inf.valid[2] && !inf.valid[3]);
  const Taps<float> nan = bilinear_taps(NAN, 0.f, 16, 16, true);
  EXPECT(nan.nan);

  // tap offsets: stride_h, stride_w
  const Taps<double> c = bilinear_taps(0.0, 0.0, 4, 4, false);  // pixel (1.5, 1.5)
  EXPECT(c.x0 == 1 && c.y0 == 1);
  EXPECT(tap_offset(c, 3, 10, 1) == 2 * 10 + 2);
  EXPECT(c.valid[0] && c.valid[1] && c.valid[2] && c.valid[3]);

  return pyface_test::finish("test_triplane_math");
}

// Unit tests of the 3D-flow warping math shared by the CPU and CUDA kernels.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "tests/expect.h"
#include "warp/warp_math.h"

using pyface_test::near;
using namespace pyface::warp;

int main() {
  // identity grid: inclusive linspace (face-vid2vid) or voxel centres; size 1 -> 0
  EXPECT(near(identity_coord<double>(0, 5, true), -1.0));
  EXPECT(near(identity_coord<double>(4, 5, true), 1.0));
  EXPECT(near(identity_coord<double>(2, 5, true), 0.0));
  EXPECT(near(identity_coord<double>(0, 4, false), -0.75));
  EXPECT(near(identity_coord<double>(3, 4, false), 0.75));
  EXPECT(near(identity_coord<double>(0, 1, true), 0.0));
  EXPECT(near(identity_coord<double>(0, 1, false), 0.0));

  // voxel-centre identity coordinates sample exactly one voxel with weight 1 (align=False)
  for (int i = 0; i < 6; ++i) {
    const double c = identity_coord<double>(i, 6, false);
    const Taps3<double> t = trilinear_taps<double>(c, c, c, 6, 6, 6, false);
    EXPECT((t.x0 == i && near(t.wx[0], 1.0, 1e-9)) || (t.x0 + 1 == i && near(t.wx[1], 1.0, 1e-9)));
  }

  // weights sum to one inside, tap validity outside, and the weights interpolate the position
  for (double x = -1.4; x <= 1.4; x += 0.13) {
    for (double z = -1.3; z <= 1.3; z += 0.17) {
      const double y = 0.3 * x - 0.2;
      const Taps3<double> t = trilinear_taps<double>(x, y, z, 7, 5, 4, false);
      double s = 0, px = 0, pz = 0;
      bool all_valid = true;
      for (int k = 0; k < 8; ++k) {
        s += t.weight(k);
        px += t.weight(k) * double(t.x0 + (k & 1));
        pz += t.weight(k) * double(t.z0 + (k >> 2));
        all_valid = all_valid && t.valid(k);
      }
      EXPECT(near(s, 1.0, 1e-12));
      if (x > -0.8 && x < 0.8 && z > -0.7 && z < 0.7) {
        EXPECT(all_valid);
        EXPECT(near(px, unnormalize(x, 7, false), 1e-12));
        EXPECT(near(pz, unnormalize(z, 4, false), 1e-12));
      }
      // d weight / d ix by central differences of the weights (away from integer points)
      const double h = 1e-7, dix = h * 2 / 7;  // dx in normalized units for a 1e-7 voxel step
      const Taps3<double> tp = trilinear_taps<double>(x + dix, y, z, 7, 5, 4, false);
      if (tp.x0 == t.x0 && tp.y0 == t.y0 && tp.z0 == t.z0) {
        for (int k = 0; k < 8; ++k) EXPECT(near((tp.weight(k) - t.weight(k)) / h, t.dwdx(k), 1e-6));
      }
    }
  }

  // far outside: every tap is out of range and the integer conversion stays defined
  const Taps3<double> far = trilinear_taps<double>(1e30, -1e30, 3.0, 8, 8, 8, true);
  for (int k = 0; k < 8; ++k) EXPECT(!far.valid(k));
  const double qnan = std::numeric_limits<double>::quiet_NaN();
  EXPECT(trilinear_taps<double>(qnan, 0.0, 0.0, 4, 4, 4, false).nan);

  // sparse motion with and without a jacobian, and its keypoint gradient
  const double kps[6] = {0.1, 0.2, 0.3, -0.4, 0.5, -0.6};
  const double kpd[6] = {0.0, -0.1, 0.2, 0.3, 0.3, 0.3};
  const double jac[18] = {1, 0, 0, 0, 1, 0, 0, 0, 1, 2, 0, 0, 0, 3, 0, 1, 0, 1};
  double m[3];
  keypoint_motion(kps, kpd, static_cast<const double*>(nullptr), 1, 0.5, 0.5, 0.5, m);
  EXPECT(near(m[0], 0.5 - 0.3 - 0.4) && near(m[1], 0.5 - 0.3 + 0.5) && near(m[2], 0.5 - 0.3 - 0.6));
  keypoint_motion(kps, kpd, jac, 1, 0.5, 0.5, 0.5, m);
  EXPECT(near(m[0], 2 * 0.2 - 0.4) && near(m[1], 3 * 0.2 + 0.5) && near(m[2], 0.2 + 0.2 - 0.6));
  double acc[15] = {};
  const double g[3] = {1.0, -2.0, 0.5};
  keypoint_motion_grad(kpd, jac, 1, 0.5, 0.5, 0.5, 2.0, g, acc);
  EXPECT(near(acc[0], 2.0) && near(acc[1], -4.0) && near(acc[2], 1.0));
  // d kp_driving = -w J^T g = -(2 * 1 + 0.5 * 1, 3 * -2 ... ) for J = [[2,0,0],[0,3,0],[1,0,1]]
  EXPECT(near(acc[3], -(2 * 2.0 + 1 * 1.0)) && near(acc[4], -(3 * -4.0)) && near(acc[5], -1.0));
  EXPECT(near(acc[6], 2.0 * 0.2) && near(acc[10], -4.0 * 0.2));

  // Gaussian heatmap: 1 at the keypoint, exp(-0.5 r^2 / var) elsewhere
  const double kp[3] = {0.1, 0.2, 0.3};
  EXPECT(near(gaussian(kp, 0.1, 0.2, 0.3, 0.01), 1.0));
  EXPECT(near(gaussian(kp, 0.2, 0.2, 0.3, 0.01), std::exp(-0.5)));

  // keypoint flow: masks_b[0] z + sum_k masks_b[k + 1] motion_k(z), masks (K+1, V) with V = 2
  const double masks[6] = {0.2, 0.9, 0.5, 0.1, 0.3, 0.0};  // voxel 0: 0.2, 0.5, 0.3
  double f[3], m0[3], m1[3];
  const double z[3] = {0.5, -0.25, 0.125};
  keypoint_motion(kps, kpd, jac, 0, z[0], z[1], z[2], m0);
  keypoint_motion(kps, kpd, jac, 1, z[0], z[1], z[2], m1);
  flow_at(masks, 2, 0, kps, kpd, jac, 2, z[0], z[1], z[2], f);
  for (int d = 0; d < 3; ++d) EXPECT(near(f[d], 0.2 * z[d] + 0.5 * m0[d] + 0.3 * m1[d]));
  // mask gradient: d <g, flow> / d mask_{k+1} = <g, motion_k(z)>, by perturbing the mask
  double masks_h[6];
  for (int i = 0; i < 6; ++i) masks_h[i] = masks[i];
  masks_h[4] += 1e-3;  // mask of keypoint 1 at voxel 0
  double fh[3];
  flow_at(masks_h, 2, 0, kps, kpd, jac, 2, z[0], z[1], z[2], fh);
  const double dflow =
      (g[0] * (fh[0] - f[0]) + g[1] * (fh[1] - f[1]) + g[2] * (fh[2] - f[2])) / 1e-3;
  EXPECT(near(mask_grad(kps, kpd, jac, 1, z[0], z[1], z[2], g), dflow, 1e-9));

  // heatmap gradient: gh * (G(kpd) - G(kps)) w.r.t. kps (acc[0..2]) and kpd (acc[3..5]),
  // against central differences
  const double var = 0.05, gh = 1.7;
  double hacc[6] = {};
  heatmap_grad(kps, kpd, z[0], z[1], z[2], var, gh, hacc);
  for (int d = 0; d < 3; ++d) {
    const double h = 1e-6;
    double sp[3] = {kps[0], kps[1], kps[2]}, sm[3] = {kps[0], kps[1], kps[2]};
    double dp[3] = {kpd[0], kpd[1], kpd[2]}, dm[3] = {kpd[0], kpd[1], kpd[2]};
    sp[d] += h, sm[d] -= h, dp[d] += h, dm[d] -= h;
    const double ds = -gh * (gaussian(sp, z[0], z[1], z[2], var) -
                             gaussian(sm, z[0], z[1], z[2], var)) / (2 * h);
    const double dd = gh * (gaussian(dp, z[0], z[1], z[2], var) -
                            gaussian(dm, z[0], z[1], z[2], var)) / (2 * h);
    EXPECT(near(hacc[d], ds, 1e-6));
    EXPECT(near(hacc[3 + d], dd, 1e-6));
  }

  return pyface_test::finish("test_warp_math");
}

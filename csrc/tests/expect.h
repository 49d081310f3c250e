// Minimal check macros shared by the standalone C++ unit tests of the kernel math (ctest).
#pragma once

#include <cmath>
#include <cstdio>

namespace pyface_test {
inline int failures = 0;
inline bool near(double a, double b, double tol = 1e-12) { return std::fabs(a - b) <= tol; }
// Prints the number of failures and returns the process exit code.
inline int finish(const char* name) {
  if (failures) {
    std::fprintf(stderr, "%s: %d failure(s)\n", name, failures);
    return 1;
  }
  std::printf("%s: all passed\n", name);
  return 0;
}
}  // namespace pyface_test

// Records (and, for the first 20, prints) a failed condition; the test goes on.
#define EXPECT(cond)                                                                   \
  do {                                                                                 \
    if (!(cond) && ++::pyface_test::failures <= 20) {                                  \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);         \
    }                                                                                  \
  } while (0)

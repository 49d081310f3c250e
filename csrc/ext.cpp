// Python module init for pyface._C. Importing the module loads the shared library, whose static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks register every op under torch.ops.pyface.
// The module itself exposes no Python functions: all entry points are torch ops.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "pyface compiled kernels (ops are registered under torch.ops.pyface)",
      -1,      // size of per-interpreter state
      nullptr  // methods
  };
  return PyModule_Create(&module_def);
}
}

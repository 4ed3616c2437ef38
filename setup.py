"""Builds libfastdiff_kernels with CMake while the package installs (``pip install [-e] .``).

The library, its Python binding and the C++ eager entries (``_eager``, built against the installed
torch) land in ``fastdiff/ops/`` (in the source tree for an editable
install), where ``fastdiff.ops._aot`` finds them.  The kernels are compiled by the interpreter that
installs fastdiff (it has torch and triton).  A build that fails, or a machine without cmake or a
C compiler, leaves the package installed without the library: fastdiff then launches every
kernel through Triton's JIT (``fastdiff.ops.info()`` says so).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def run(self):
        self.built = self._cmake()
        if self.built is None:
            self.extensions = []  # installed without the library: fastdiff uses Triton's JIT
        super().run()

    def _cmake(self) -> list[str] | None:
        """Build the library and its binding; their paths, or None (with a warning) when the build fails."""
        build = os.path.join(ROOT, "build", "kernels")
        # the interpreter outside pip's isolated build environment: it has torch and triton
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "TRITON_INTERPRET")}
        cmake, ninja = _tool("cmake"), _tool("ninja")
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        try:
            if not cmake:
                raise OSError("no cmake")
            # FASTDIFF_ARCHS="80;90;100" (say) in the environment: the compute capabilities to compile for
            archs = [f"-DFASTDIFF_ARCHS={os.environ['FASTDIFF_ARCHS']}"] if os.environ.get("FASTDIFF_ARCHS") else []
            subprocess.run([cmake, "-S", ROOT, "-B", build, *generator, f"-DFASTDIFF_PYTHON={sys.executable}",
                            "-DCMAKE_BUILD_TYPE=Release", *archs], check=True, env=env)  # fmt: skip
            subprocess.run([cmake, "--build", build], check=True, env=env)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"warning: libfastdiff_kernels not built ({exc}); fastdiff will use Triton's JIT", file=sys.stderr)
            return None
        modules = [p for name in ("_aot_binding", "_eager") for p in glob.glob(os.path.join(build, f"{name}*.so"))]
        return [os.path.join(build, "libfastdiff_kernels.so"), *modules]

    def build_extension(self, ext):
        """The library next to its binding in fastdiff/ops: in the wheel, and in the source tree when editable."""
        binding = self.get_ext_fullpath(ext.name)
        folders = {os.path.dirname(os.path.abspath(binding))}
        if getattr(self, "editable_mode", False) or self.inplace:
            folders.add(os.path.join(ROOT, "fastdiff", "ops"))
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            for path in self.built:
                shutil.copy2(path, os.path.join(folder, os.path.basename(path)))
        shutil.copy2(next(p for p in self.built if "_aot_binding" in p), binding)


def _tool(name: str) -> str | None:
    """cmake / ninja: the real binary of their PyPI wheels (build requirements), else the system's."""
    return _pip_tool(name) or shutil.which(name)


def _pip_tool(name: str) -> str | None:
    """cmake / ninja from their PyPI wheels (build requirements) when the system has none."""
    try:
        module = __import__(name)
    except ImportError:
        return None
    folder = getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR", os.path.dirname(module.__file__))
    binary = os.path.join(folder, name)
    return binary if os.path.exists(binary) else None


setup(ext_modules=[Extension("fastdiff.ops._aot_binding", sources=[])], cmdclass={"build_ext": CMakeBuild})

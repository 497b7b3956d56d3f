#!/usr/bin/env bash
# Build-time CUDA 13.0 toolkit from NVIDIA's PyPI wheels, for `cargo build --features cuda` on a machine
# with no GPU and no system CUDA. Prints the environment to use on stdout (everything else goes to stderr):
#
#   eval "$(scripts/cuda-toolkit.sh)"            # nvcc, headers, link libraries, CUDA_COMPUTE_CAP=90
#   KILN_CUDNN=1 eval "$(scripts/cuda-toolkit.sh)"   # also cuDNN 9 for CUDA 13 (nvidia-cudnn-cu13)
#
# The toolkit is pinned to the 13.0 series: the device machines' driver (580) runs CUDA 13.0, and PTX made
# by a newer nvcc may not load under it. Override the venv folder with CUDA_TOOLKIT_VENV and the target GPU
# with CUDA_COMPUTE_CAP (90 = H100/H200; candle builds its kernels for exactly this one).
set -euo pipefail
ENV=${CUDA_TOOLKIT_VENV:-/tmp/kiln-cuda-toolkit}
LINK=$ENV/link
CAP=${CUDA_COMPUTE_CAP:-90}
PKGS=(nvidia-cuda-nvcc==13.0.88 "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
      "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*")
# cuDNN 9 for CUDA 13; the device machines' PyTorch image carries the same package, so the binary finds it there.
if [ "${KILN_CUDNN:-0}" = 1 ]; then PKGS+=("nvidia-cudnn-cu13==9.*"); fi

if [ ! -x "$ENV/bin/pip" ]; then python3 -m venv "$ENV" >&2; fi
"$ENV/bin/pip" install -q --disable-pip-version-check "${PKGS[@]}" >&2
SITE=$(echo "$ENV"/lib/python3*/site-packages)
CU=$SITE/nvidia/cu13
[ -x "$CU/bin/nvcc" ] || { echo "cuda-toolkit.sh: no nvcc under $CU/bin" >&2; exit 1; }

# candle links cudarc's libraries dynamically: the linker wants the unversioned names that only a system
# toolkit's -dev packages carry, so link them to the wheels' versioned files.
mkdir -p "$LINK"
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13; do
  ln -sf "$CU/lib/$lib" "$LINK/${lib%%.so.*}.so"
done
if [ "${KILN_CUDNN:-0}" = 1 ]; then
  CUDNN=$(ls -d "$SITE"/nvidia/cudnn "$CU" 2>/dev/null | while read -r d; do
    [ -e "$d/lib/libcudnn.so.9" ] && echo "$d"; done | head -n1)
  [ -n "$CUDNN" ] || { echo "cuda-toolkit.sh: libcudnn.so.9 not found in the cudnn wheel" >&2; exit 1; }
  ln -sf "$CUDNN/lib/libcudnn.so.9" "$LINK/libcudnn.so"
fi

# libcuda.so belongs to the driver, which no wheel ships. A stub defining every cu* entry point named in
# cuda.h, with the driver's soname, satisfies the link; at run time the real libcuda.so.1 is loaded.
if [ ! -f "$LINK/libcuda.so" ] || [ "$CU/include/cuda.h" -nt "$LINK/libcuda.so" ]; then
  {
    echo "/* link-time stub of the CUDA driver API; never loaded at run time */"
    grep -ho '\bcu[A-Z][A-Za-z0-9_]*' "$CU/include/cuda.h" | sort -u | while read -r sym; do
      echo "void $sym(void) {}"
    done
  } > "$LINK/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/stub.c" >&2
fi

INC=$CU/include
[ "${KILN_CUDNN:-0}" = 1 ] && INC="$INC:$CUDNN/include"
cat <<EOS
export PATH="$CU/bin:\$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU" CUDA_COMPUTE_CAP=$CAP
export CPATH="$INC\${CPATH:+:\$CPATH}" KILN_CUDA_LINK="$LINK"
# cudarc names a few cuBLASLt entry points newer than 13.0's library: leave those unresolved and bind
# lazily, so they matter only if called (kiln does not call them).
export RUSTFLAGS="\${RUSTFLAGS:-} -L $LINK -C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files -C link-arg=-Wl,-z,lazy"
EOS
